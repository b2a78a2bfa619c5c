"""A one-step latent generator distilled from the LDM (python/distill.py trains it): the teacher's denoiser, called
once at t = T-1 on x_T, read as x_0.

Its v-prediction gives x_0 = a x_T - s v (a, s: the schedule at T-1), which is where it starts (the teacher's own
one-call guess) before it learns to map x_T to the teacher's x_0. Used like a GAN generator, with z = x_T
flattened (z_dim = C x H x W).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from python.core.diffusion import Schedule
from python.core.errors import UserError
from python.models.denoiser import Denoiser, DenoiserConfig


class OneStep(nn.Module):
    """(z: N x C*H*W noise, cond: N x 24) -> latents N x C x H x W, through one call of a denoiser at t = T-1."""

    def __init__(self, dcfg: DenoiserConfig, schedule: dict):
        super().__init__()
        sch = Schedule(**schedule)
        if sch.prediction != "v_prediction":
            raise UserError(f"the one-step student needs a v-prediction teacher (x_0 = a x - s v is stable at t = T-1; "
                            f"epsilon would divide by a ~ 0), got {sch.prediction!r}")
        self.denoiser, self.schedule = Denoiser(dcfg), schedule
        a, s = sch.coeffs(np.array([sch.T - 1]))
        self.t, self.a, self.s = sch.T - 1, float(a[0]), float(s[0])
        self.cfg = copy.copy(dcfg)
        self.cfg.z_dim = dcfg.in_channels * dcfg.size * dcfg.size  # what the GAN path reads

    def forward(self, z, cond):
        c, h = self.denoiser.cfg.in_channels, self.denoiser.cfg.size
        x = z.reshape(z.shape[0], c, h, h)  # (N, C, H, W)
        t = torch.full((z.shape[0],), self.t, dtype=torch.long, device=z.device)
        return self.a * x - self.s * self.denoiser(x, t, cond)  # (N, C, H, W)
