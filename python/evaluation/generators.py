"""Either generator of a weights folder (LDM or GAN path) with its VAE decoder, in torch: images for conditions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from python.core.best_of import best_of_latents
from python.core.diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    Schedule,
    check_eta,
)
from python.core.errors import UserError
from python.models.classifier import load_class_grad
from python.models.denoiser import load_denoiser
from python.models.generators import load_generator
from python.models.sampling import decode, gan_latents, ldm_latents
from python.models.vae import Decoder, load_vae, require_latent_space

MODELS = ("ldm", "gan")


class TorchGenerator:
    """latents(cond, seed) and images(cond, seed) for the `model` ("ldm" or "gan") of a weights folder holding
    vae/ and ldm/ or gan/ (and guide/, the guidance classifier, for the LDM at class_scale > 0). The network runs on
    `device`; sampler maths, decoder and judge stay on the host."""

    def __init__(self, model: str, weights: Path, sampler: str = "dpmpp", device: str = "cpu", eta: float = 0.0):
        if model not in MODELS:
            raise UserError(f"--model must be 'ldm' or 'gan', got {model!r}")
        if check_eta(eta, "--eta") and (model != "ldm" or sampler != "ddim"):
            raise UserError(f"--eta {eta:g} is DDIM's noise; it needs --model ldm --sampler ddim (got --model {model} "
                            f"--sampler {sampler}); DPM-Solver++ and the GAN path are deterministic")
        self.model, self.sampler, self.device, self.eta = model, sampler, device, eta
        self.weights, self._class_grad = Path(weights), None
        vae_dir = Path(weights) / "vae"
        self.decoder = Decoder(load_vae(vae_dir)).eval()
        if model == "ldm":
            self.net, cfg = load_denoiser(Path(weights) / "ldm", device)
            self.schedule = Schedule(**cfg["schedule"])
        else:
            self.net, cfg = load_generator(Path(weights) / "gan", device)
        require_latent_space(Path(weights) / model, cfg, vae_dir)

    def sampler_for(self, steps: int) -> str | None:
        """The sampler that runs at `steps`: DDPM at the schedule's every step (T), else the one asked for; None for
        the GAN path."""
        if self.model != "ldm":
            return None
        return "ddpm" if steps == self.schedule.T else self.sampler

    def latents(self, cond: np.ndarray, seed: int = 0, steps: int = 25, guidance: float = DEFAULT_GUIDANCE,
                on_step=None, seeds=None, apg_norm: float = DEFAULT_APG_NORM,
                class_scale: float = DEFAULT_CLASS_SCALE, class_iters: int = DEFAULT_CLASS_ITERS) -> torch.Tensor:
        if self.model == "gan":
            return gan_latents(self.net, cond, seed, device=self.device, seeds=seeds)
        return ldm_latents(self.net, self.schedule, cond, self.sampler_for(steps), steps, guidance, seed=seed,
                           eta=self.eta, on_step=on_step, device=self.device, seeds=seeds, apg_norm=apg_norm,
                           class_grad=self.class_grad() if class_scale else None, class_scale=class_scale,
                           class_iters=class_iters)

    def class_grad(self):
        """The guidance classifier's gradient module (weights/guide), loaded on first use."""
        if self._class_grad is None:
            self._class_grad = load_class_grad(self.weights / "guide", self.weights / "vae").to(self.device)
        return self._class_grad

    def images(self, cond: np.ndarray, seed: int = 0, steps: int = 25, guidance: float = DEFAULT_GUIDANCE,
               on_step=None, best_of: int = 1, classifier=None, apg_norm: float = DEFAULT_APG_NORM,
               class_scale: float = DEFAULT_CLASS_SCALE, class_iters: int = DEFAULT_CLASS_ITERS) -> torch.Tensor:
        """Decoded images in [-1, 1]; with best_of > 1, the best of that many candidates per condition by the
        latent `classifier` (python/core/best_of.py)."""
        if best_of == 1:
            return decode(self.decoder, self.latents(cond, seed, steps, guidance, on_step, apg_norm=apg_norm,
                                                     class_scale=class_scale, class_iters=class_iters))
        logits = (lambda z: classifier(torch.from_numpy(z)).numpy()) if classifier is not None else None
        with torch.no_grad():
            lat = best_of_latents(lambda c, seeds: self.latents(c, steps=steps, guidance=guidance, seeds=seeds,
                                                               apg_norm=apg_norm, class_scale=class_scale,
                                                               class_iters=class_iters).numpy(),
                                  cond, best_of, logits, seed)
        return decode(self.decoder, torch.from_numpy(lat))
