"""The GAN path's generator, whichever kind a weights folder holds: config.json's "kind" says which.

- "adversarial": python.models.gan.Generator, trained against a discriminator (python -m python.train_gan);
  its settings under "gan".
- "distilled": python.models.one_step.OneStep, the LDM's one-step student (python -m python.distill); its
  teacher's denoiser and schedule under "distilled".

"kind" names the network; "objective", where present, what trained it (python -m python.adversarial): "adversarial"
for a one-step student fine-tuned against real latents with a discriminator (settings under "discriminator"), "dmd"
for distribution matching against the guided LDM (settings under "dmd"), "adversarial+dmd" for both; absent for the
regression-to-teacher students of python -m python.distill.

Both are (z: N x z_dim, cond: N x 24) -> latents, so export, runtime, server and bench take either. A one-step
student of a layout LDM (DenoiserConfig.layout) reads the wider rows of python/core/layout.py: its placement prior
(layouts.npz, `gen.layout_bank`) is saved and loaded beside its weights, and every sampler draws the places from it
as the LDM's samplers do. A config.json without "kind" (written before it existed) is read by the key it has.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from python.core.errors import UserError
from python.core.layout import LayoutBank
from python.models.denoiser import DenoiserConfig
from python.models.gan import GANConfig, Generator
from python.models.one_step import OneStep
from python.models.weights import SHIPPED, load_state_into, read_config, save_weights

SHIPPED_GAN = SHIPPED / "gan"
KINDS = ("adversarial", "distilled")


def generator_kind(cfg: dict, where: Path | str = "config.json") -> str:
    kind = cfg.get("kind") or ("distilled" if "distilled" in cfg else "adversarial" if "gan" in cfg else None)
    if kind not in KINDS:
        raise UserError(f"{where}: not a generator config (kind {kind!r}; valid kinds: {', '.join(KINDS)})")
    return kind


def build_generator(cfg: dict, where: Path | str = "config.json") -> torch.nn.Module:
    """An untrained generator of the kind and shape a config (a weights folder's or a run's) describes."""
    kind = generator_kind(cfg, where)
    try:
        if kind == "distilled":
            return OneStep(DenoiserConfig(**cfg["distilled"]["denoiser"]), cfg["distilled"]["schedule"])
        return Generator(GANConfig(**cfg["gan"]))
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: a {kind} generator config without its settings ({type(e).__name__}: {e})") from None


def generator_config(gen: torch.nn.Module) -> dict:
    """The config.json entries that rebuild `gen` (build_generator's input)."""
    if isinstance(gen, OneStep):
        return {"kind": "distilled", "distilled": {"denoiser": asdict(gen.denoiser.cfg), "schedule": gen.schedule}}
    return {"kind": "adversarial", "gan": asdict(gen.cfg)}


def reads_layout(gen: torch.nn.Module) -> bool:
    """Whether a generator's condition rows carry each object's place (python/core/layout.py)."""
    return bool(getattr(gen.cfg, "layout", False))


def save_generator(gen: torch.nn.Module, folder: Path, extra: dict | None = None, half: bool = False) -> None:
    """Weights and config; a layout generator's placement prior (`gen.layout_bank`) beside them."""
    if reads_layout(gen) and getattr(gen, "layout_bank", None) is None:
        raise UserError("a layout generator is saved with its placement prior: set gen.layout_bank (its teacher's, "
                        "python.data.layout.make_bank) first")
    save_weights(folder, gen, "generator.safetensors", {**generator_config(gen), **(extra or {})}, half,
                 also=gen.layout_bank.save if reads_layout(gen) else None)


def load_generator(folder: Path | None = None, device="cpu") -> tuple[torch.nn.Module, dict]:
    folder = Path(folder) if folder else SHIPPED_GAN
    cfg = read_config(folder, "generator.safetensors", "GAN",
                      "python -m python.train_gan` or `python -m python.distill")
    gen = load_state_into(build_generator(cfg, folder / "config.json"), folder / "generator.safetensors")
    if reads_layout(gen):  # the placement prior the samplers draw the places from (python/core/layout.py)
        gen.layout_bank = LayoutBank.load(folder)
    return gen.to(device).eval(), cfg
