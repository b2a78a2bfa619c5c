"""Representation alignment (REPA, Yu et al. 2024) for the latent denoiser.

The denoiser's hidden patch tokens at one block, seen through a small trained projector, are pulled towards a
frozen encoder's features of the clean latent at the same place (negative cosine similarity per token). The
denoiser then has to work out, from the noisy x_t, what the clean image holds where; the diffusion loss alone
teaches that slowly (bench/feature_probe.py: a linear probe reads the shipped denoiser's label set at 0.56).

The encoder here is a label classifier of latents trained on real latents only (python/models/classifier.py; never
a judge): its intermediate maps say which object is where. Each of its stages from `first_stage` on is resized to
the denoiser's token grid, the maps are concatenated (per token: 96 + 192 channels for the shipped classifier's
8x8 and 4x4 stages on a 8x8 grid) and each channel is standardised over a fixed sample of the data (`fit`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from python.core.errors import UserError
from python.models.classifier import LatentClassifier


class Projector(nn.Module):
    """The denoiser's token width -> the encoder's feature width: REPA's three-layer SiLU MLP, per token."""

    def __init__(self, width: int, out: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, h):
        return self.net(h)


def _stage_ends(cls: LatentClassifier) -> list[int]:
    """Indices into cls.features after which each stage (a width of LatentClassifier) ends."""
    convs = [i for i, m in enumerate(cls.features) if isinstance(m, nn.Conv2d)]
    # two convolutions per stage, each followed by batch norm and ReLU
    return [convs[k + 1] + 2 for k in range(0, len(convs), 2)]


class ClassifierTargets(nn.Module):
    """clean latents (N, C, H, W) -> (N, g * g, channels): a frozen LatentClassifier's stage maps from
    `first_stage` on, each resized to the g x g token grid (area average down, nearest up), in the denoiser's token
    order (row-major, as patchify flattens), standardised per channel once `fit`."""

    def __init__(self, cls: nn.Module, grid: int, first_stage: int = 1):
        super().__init__()
        if not isinstance(cls, LatentClassifier):
            raise UserError(f"REPA needs a label classifier of latents (LatentClassifier), got {type(cls).__name__}")
        ends = _stage_ends(cls)
        if not 0 <= first_stage < len(ends):
            raise UserError(f"--repa-stage must be in 0..{len(ends) - 1} (the classifier's stages), got {first_stage}")
        self.cls, self.grid, self.ends = cls.eval().requires_grad_(False), grid, ends[first_stage:]
        self.channels = sum(cls.features[e - 2].out_channels for e in self.ends)  # each stage ends conv, BN, ReLU
        self.register_buffer("mean", torch.zeros(self.channels))
        self.register_buffer("std", torch.ones(self.channels))

    @torch.no_grad()
    def fit(self, z0: torch.Tensor) -> "ClassifierTargets":
        """Standardise each channel by its mean and spread over these clean latents (a fixed sample of the
        data). The maps come out of a ReLU, all >= 0: without it a constant projection would already score a high
        cosine similarity, and the term would reward the mean instead of what varies from place to place."""
        self.mean.zero_()
        self.std.fill_(1.0)
        f = self(z0).flatten(0, 1)  # (N * L, channels)
        self.mean.copy_(f.mean(0))
        self.std.copy_(f.std(0).clamp(min=1e-3))
        return self

    @torch.no_grad()
    def forward(self, z0):
        maps, x = [], z0
        for i, m in enumerate(self.cls.features[: self.ends[-1] + 1]):
            x = m(x)
            if i in self.ends:
                size = x.shape[-1]
                maps.append(F.adaptive_avg_pool2d(x, self.grid) if size > self.grid else
                            F.interpolate(x, size=(self.grid, self.grid), mode="nearest"))
        return (torch.cat(maps, 1).flatten(2).transpose(1, 2) - self.mean) / self.std  # (N, g * g, channels)


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """REPA's term: minus the mean cosine similarity between projected tokens and the encoder's, (N, L, c) each."""
    return -F.cosine_similarity(projected.float(), targets.float(), dim=-1).mean()
