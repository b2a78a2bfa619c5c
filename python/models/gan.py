"""The conditional latent GAN: a generator from (noise, label set) to a VAE latent grid, and a
projection discriminator with an auxiliary multi-label classifier, both on latents.

Generator: [noise, label embedding] -> 4x4 grid -> (upsample, conv, conditional norm) x log2(size/4)
-> latent channels. Every block is modulated by the condition (FiLM from the concatenated noise and
label embedding: per-channel scale and shift after a parameter-free group norm), so the label set
steers every resolution. The label embedding of a set is the sum of its classes' embeddings (a
linear map of the multi-hot vector), so sets compose.

Discriminator: strided convolutions with spectral norm -> feature vector h; output =
linear(h) + <sum of the present classes' embeddings, h> / number of objects (projection
discriminator, Miyato & Koyama 2018, extended to label sets), plus an auxiliary head that predicts
the multi-hot labels (trained on real latents only, as in AC-GAN), whose judgement the generator
also has to satisfy.

PatchDiscriminator: the same game on decoded 64x64 images, patch by patch (the decoder's adversarial term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from python.core.errors import UserError
from python.core.labels import NUM_CLASSES


@dataclass
class GANConfig:
    latent_channels: int = 4
    size: int = 16
    z_dim: int = 128
    emb_dim: int = 128
    g_channels: tuple = (256, 128, 64)  # at 4x4, 8x8, 16x16
    d_channels: tuple = (64, 128, 256)  # at 16x16, 8x8, 4x4
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        self.g_channels, self.d_channels = tuple(self.g_channels), tuple(self.d_channels)
        if 4 * 2 ** (len(self.g_channels) - 1) != self.size:
            raise UserError(f"g_channels {self.g_channels} must have log2(size/4)+1 entries for size {self.size}")


def _norm(c: int) -> nn.Module:
    """Group norm without affine parameters (FiLM supplies them). Not batch norm: an EMA of the weights does not
    match batch norm's running statistics (the EMA generator in eval mode drew latents of the wrong scale), and
    batch statistics would make an image depend on its batch-mates."""
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c, affine=False)


class CondBlock(nn.Module):
    """upsample x2 -> conv3x3 -> GN(no affine) -> FiLM(cond) -> ReLU -> conv3x3 -> GN -> FiLM -> ReLU, + skip."""

    def __init__(self, cin: int, cout: int, cdim: int, up: bool):
        super().__init__()
        self.up = up
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.n1, self.n2 = _norm(cout), _norm(cout)
        self.film = nn.Linear(cdim, 4 * cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, c):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        g1, b1, g2, b2 = self.film(c)[:, :, None, None].chunk(4, dim=1)
        h = F.relu(self.n1(self.c1(x)) * (1 + g1) + b1)
        h = F.relu(self.n2(self.c2(h)) * (1 + g2) + b2)
        return h + self.skip(x)


class Generator(nn.Module):
    """(noise z: N x z_dim, cond: N x 24 multi-hot) -> latent (N, C, size, size) at generator scale."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        cdim = cfg.z_dim + cfg.emb_dim
        self.embed = nn.Linear(cfg.num_classes, cfg.emb_dim, bias=False)  # = sum of class embeddings
        self.fc = nn.Linear(cdim, 16 * cfg.g_channels[0])
        chans = cfg.g_channels
        self.blocks = nn.ModuleList(CondBlock(chans[max(i - 1, 0)], chans[i], cdim, up=i > 0) for i in range(len(chans)))
        self.out = nn.Sequential(_norm(chans[-1]), nn.ReLU(), nn.Conv2d(chans[-1], cfg.latent_channels, 3, 1, 1))

    def forward(self, z, cond):
        c = torch.cat([z, self.embed(cond)], dim=1)
        h = self.fc(c).view(-1, self.cfg.g_channels[0], 4, 4)
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(h)


class Discriminator(nn.Module):
    """latent -> (realness score N, auxiliary label logits N x 24)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        layers, cin = [], cfg.latent_channels
        for i, w in enumerate(cfg.d_channels):
            stride = 1 if i == 0 else 2
            layers += [spectral_norm(nn.Conv2d(cin, w, 3, stride, 1)), nn.LeakyReLU(0.2),
                       spectral_norm(nn.Conv2d(w, w, 3, 1, 1)), nn.LeakyReLU(0.2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(cin + 1, 1))  # + the minibatch-std feature
        self.embed = spectral_norm(nn.Linear(cfg.num_classes, cin, bias=False))
        self.aux = nn.Linear(cin, cfg.num_classes)

    @staticmethod
    def minibatch_std(f: torch.Tensor, group: int = 4) -> torch.Tensor:
        """Per sample: the mean standard deviation of the features across its group of `group` batch-mates
        (Karras et al. 2018): a collapsed generator's samples look alike, and this feature lets D see it."""
        n = f.shape[0]
        g = next(k for k in range(min(group, n), 0, -1) if n % k == 0)
        s = f.view(g, n // g, -1).std(dim=0, unbiased=False).mean(dim=1) if g > 1 else f.new_zeros(n)
        return s.repeat(g)[:, None]

    def forward(self, x, cond):
        f = self.features(x)
        h = f.sum(dim=(2, 3))
        proj = (self.embed(cond) * h).sum(1) / cond.sum(1).clamp_min(1)
        return self.linear(torch.cat([h, self.minibatch_std(f)], 1)).squeeze(1) + proj, self.aux(h)


class PatchDiscriminator(nn.Module):
    """64x64 image -> 8x8 real/fake logits (three stride-2 convolutions: each logit sees a ~22-pixel patch)."""

    def __init__(self, width: int = 32):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), act(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), act(),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.GroupNorm(8, 4 * width), act(),
            nn.Conv2d(4 * width, 1, 3, 1, 1))

    def forward(self, x):
        return self.net(x)
