"""Generation with torch: the torch adapter of the core sampling loop (python/core/sampling.py), and the VAE decoder.

The runtime runs the same loop with ONNX Runtime sessions as the model calls; both draw their noise from numpy with
the same seed, so their outputs can be compared one to one.
"""
from __future__ import annotations

import numpy as np
import torch

from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_CLASS_ITERS, DEFAULT_GUIDANCE, Schedule
from python.core.errors import UserError
from python.core.sampling import ModelCall, diffusion_latents, one_step_latents
from python.models.generators import reads_layout


def torch_call(model: torch.nn.Module, device="cpu", bf16: bool = False) -> ModelCall:
    """A torch network as the core loop calls it: numpy arrays in (moved to `device`), float32 numpy out."""
    device = torch.device(device)

    @torch.no_grad()
    def call(*arrays):
        inputs = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(*inputs)
        return out.float().cpu().numpy()

    return call


def ldm_latents(model, schedule: Schedule, cond, sampler: str = "dpmpp", steps: int = 20,
                guidance: float = DEFAULT_GUIDANCE, seed: int = 0, eta: float = 0.0, on_step=None, batch: int = 256,
                bf16: bool = False, device="cpu", seeds=None, apg_norm: float = DEFAULT_APG_NORM,
                class_grad=None, class_scale: float = 0.0, class_iters: int = DEFAULT_CLASS_ITERS) -> torch.Tensor:
    """Latents (generator scale) of a torch denoiser for multi-hot conditions (N, 24), in chunks of `batch`
    (apg_norm; class_grad, a python.models.classifier.ClassifierGradient, class_scale and class_iters: classifier
    guidance;
    python.core.sampling.guided)."""
    shape = (model.cfg.in_channels, model.cfg.size, model.cfg.size)
    grad = torch_call(class_grad, device) if class_grad is not None else None
    if model.cfg.layout and getattr(model, "layout_bank", None) is None:
        raise UserError("this denoiser reads object layouts but carries no placement prior (layout_bank); load it "
                        "with load_denoiser from a folder that has layouts.npz")
    return torch.from_numpy(diffusion_latents(torch_call(model, device, bf16), schedule, cond, shape, sampler, steps,
                                              guidance, eta, seed, seeds, batch, on_step=on_step,
                                              apg_norm=apg_norm, class_grad=grad, class_scale=class_scale,
                                              class_iters=class_iters,
                                              layout_bank=getattr(model, "layout_bank", None)))


def gan_latents(gen, cond, seed: int = 0, batch: int = 1024, device="cpu", seeds=None) -> torch.Tensor:
    """Latents of a torch GAN-path generator (either kind) for multi-hot conditions; a layout generator draws each
    row's places from its `layout_bank` (python.models.generators.load_generator attaches it)."""
    bank = getattr(gen, "layout_bank", None)
    if reads_layout(gen) and bank is None:
        raise UserError("this generator reads object layouts but carries no placement prior (layout_bank); load it "
                        "with load_generator from a folder that has layouts.npz")
    return torch.from_numpy(one_step_latents(torch_call(gen, device), cond, gen.cfg.z_dim, seed, seeds, batch,
                                             layout_bank=bank))


@torch.no_grad()
def decode(decoder, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Generator-scale latents -> images in [-1, 1] through the VAE decoder (python.models.vae.Decoder)."""
    return torch.cat([decoder(latents[i:i + batch]) for i in range(0, len(latents), batch)])
