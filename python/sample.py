"""Generation with torch: the LDM sampler (shared maths in python/diffusion.py) and the GAN, then the
VAE decoder. The runtime does the same with ONNX Runtime; both draw their noise from numpy with
the same seed, so their outputs can be compared one to one.
"""
from __future__ import annotations

import numpy as np
import torch

from python.diffusion import Schedule, guide, make_sampler, sample_loop


def initial_noise(seed: int, n: int, shape) -> np.ndarray:
    """x_T for n samples: float32 standard normal from numpy's PCG64 (identical in torch and runtime)."""
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


def step_noise(seed: int, n: int, shape):
    """noise(i) for stochastic samplers: its own stream per step, independent of x_T's."""
    return lambda i: np.random.default_rng([seed, 1, i]).standard_normal((n, *shape), dtype=np.float32)


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


@torch.no_grad()
def ldm_latents(model, schedule: Schedule, cond, sampler: str = "dpmpp", steps: int = 20, guidance: float = 2.0,
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


def grid(images: torch.Tensor | np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> one uint8 RGB grid image, `cols` per row (the course shows 8)."""
    from python.data import to_uint8

    imgs = to_uint8(images)
    n, h, w, _ = imgs.shape
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out
