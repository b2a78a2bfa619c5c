"""Loss terms the trainers share, each a small function of tensors."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from python.core.diffusion import Schedule, add_noise, target


def min_snr_weight(schedule: Schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weight (Hang et al. 2023) of the eps (or v) objective at timesteps t; gamma <= 0 -> 1."""
    if gamma <= 0:
        return torch.ones(len(t))
    snr = torch.from_numpy(schedule.snr(t.numpy())).float()
    clipped = snr.clamp(max=gamma)
    return clipped / snr if schedule.prediction == "epsilon" else clipped / (snr + 1)


def coeff_tables(schedule: Schedule, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule's (a_t, s_t) for every t = 0..T-1 as float32 tensors shaped (T, 1, 1, 1): indexed by a batch of
    timesteps, they broadcast over latents (N, C, H, W). What diffusion_loss takes as `tables`."""
    return tuple(torch.from_numpy(c).float().to(device)[:, None, None, None]
                 for c in schedule.coeffs(np.arange(schedule.T)))


def diffusion_loss(net, z0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, tables,
                   weights: torch.Tensor, prediction: str, feature_layer: int | None = None):
    """The denoiser's training loss: `net` at z0 noised to timesteps t with eps, the squared error to the
    schedule's target averaged per sample and weighted by `weights[t]` (min-SNR), then the mean. tables = the
    coeff_tables(schedule). Returns (loss, x_t, the network's output); with feature_layer, the output is
    (output, the hidden tokens after that block) from the same pass."""
    ca, cs = tables[0][t], tables[1][t]
    x_t = add_noise(z0, eps, ca, cs)
    res = net(x_t, t, cond) if feature_layer is None else net(x_t, t, cond, feature_layer=feature_layer)
    out = res if feature_layer is None else res[0]
    per_sample = F.mse_loss(out.float(), target(z0, eps, ca, cs, prediction), reduction="none").mean((1, 2, 3))
    return (per_sample * weights[t]).mean(), x_t, res


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last: torch.Tensor, cap: float = 1e4) -> torch.Tensor:
    """||d rec_loss / d last|| / ||d adv_loss / d last||: the scale at which an adversarial term pulls the last layer
    as hard as the reconstruction (or regression) loss does (Esser et al. 2021)."""
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-8)).clamp(max=cap).detach()


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 distance between the images' finite-difference gradients: weighs edges and corners over flat areas."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(x) - dx(y)).abs().mean() + (dy(x) - dy(y)).abs().mean()


def class_term(classifiers: list, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The mean over frozen `classifiers` of their binary cross-entropy for the labels `cond` on `latents`."""
    return sum(F.binary_cross_entropy_with_logits(c(latents), cond) for c in classifiers) / len(classifiers)


def noise_augment(x: torch.Tensor, max_std: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """x + s * eps with s ~ U[0, max_std] per sample (a classifier's smoothing); x itself if max_std is 0."""
    if max_std <= 0:
        return x
    s = torch.rand(x.shape[0], 1, 1, 1, generator=gen, device=x.device) * max_std
    return x + s * torch.randn(x.shape, generator=gen, device=x.device)


def count_reward(counter, latents: torch.Tensor, cond: torch.Tensor, present: float = 1.0, absent: float = 1.0,
                 total: float = 1.0, parts: dict | None = None) -> torch.Tensor:
    """The counter's cross-entropy for "exactly the label set `cond` (N, 24 multi-hot)": the mean over requested
    classes of -log p(there), over the other classes of -log p(not there) (each a mean per image, so a set's size
    does not change its weight), and -log p(k objects in all), which a requested class drawn twice also fails;
    weighted and averaged over the images. `parts`, if given, receives the three unweighted means (for the log)."""
    labels, tot = counter(latents)
    ce = F.binary_cross_entropy_with_logits(labels, cond, reduction="none")
    pos = (ce * cond).sum(1) / cond.sum(1).clamp(min=1)
    neg = (ce * (1 - cond)).sum(1) / (1 - cond).sum(1).clamp(min=1)
    tl = F.cross_entropy(tot, cond.sum(1).long().clamp(max=tot.shape[1] - 1), reduction="none")
    if parts is not None:
        parts.update(present=pos.mean().item(), absent=neg.mean().item(), total=tl.mean().item())
    return (present * pos + absent * neg + total * tl).mean()
