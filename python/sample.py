"""Generation with torch: the LDM sampler (shared maths in python/diffusion.py) and the GAN, then the
VAE decoder. The runtime does the same with ONNX Runtime; both draw their noise from numpy with
the same seed, so their outputs can be compared one to one.
"""
from __future__ import annotations

import numpy as np
import torch

from python.diffusion import DEFAULT_GUIDANCE, Schedule, guide, make_sampler, sample_loop
from python.noise import initial_noise, step_noise


def guided_denoiser(model, cond: torch.Tensor, scale: float, bf16: bool = False):
    """denoise(x, t) for sample_loop: conditional and unconditional passes batched into one model call."""
    n = len(cond)
    both = torch.cat([cond, torch.zeros_like(cond)]) if scale != 1.0 else cond

    @torch.no_grad()
    def denoise(x, t):
        xin = torch.cat([x, x]) if scale != 1.0 else x
        tt = torch.full((len(xin),), t, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xin.float(), tt, both).float()
        return guide(out[:n], out[n:], scale) if scale != 1.0 else out

    return denoise


class OnDevice(torch.nn.Module):
    """A network on a training device called with host tensors, as the samplers and the evaluation call it (their
    maths runs on the host, as in the runtime): tensors in are moved there, the float32 result comes back."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device, self.cfg = model, torch.device(device), model.cfg

    @torch.no_grad()
    def forward(self, *args):
        out = self.model(*(torch.as_tensor(x).to(self.device) for x in args))
        return out.float().cpu()


@torch.no_grad()
def ldm_latents(model, schedule: Schedule, cond, sampler: str = "dpmpp", steps: int = 20, guidance: float = DEFAULT_GUIDANCE,
                seed: int = 0, eta: float = 0.0, on_step=None, batch: int = 256, bf16: bool = False) -> torch.Tensor:
    """Latents (generator scale) for multi-hot conditions (N, 24), in chunks of `batch`."""
    cond = torch.as_tensor(np.asarray(cond), dtype=torch.float32)
    shape = (model.cfg.in_channels, model.cfg.size, model.cfg.size)
    x_T = torch.from_numpy(initial_noise(seed, len(cond), shape))
    noise = step_noise(seed, len(cond), shape)
    out = []
    for s in range(0, len(cond), batch):
        sl = slice(s, s + batch)
        smp = make_sampler(sampler, schedule, steps, eta)
        out.append(sample_loop(smp, x_T[sl], guided_denoiser(model, cond[sl], guidance, bf16),
                               noise=lambda i: torch.from_numpy(noise(i)[sl]),
                               on_step=(lambda i, x: on_step(i, x, sl)) if on_step else None))
    return torch.cat(out)


@torch.no_grad()
def decode(decoder, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Generator-scale latents -> images in [-1, 1] through the VAE decoder (python.vae.Decoder)."""
    return torch.cat([decoder(latents[i:i + batch]) for i in range(0, len(latents), batch)])
