"""Training a label classifier of latents on real latents only (python/models/classifier.py has the networks)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from python.models.classifier import (
    LATENT_WIDTHS,
    CountClassifier,
    LatentClassifier,
    PixelClassifier,
    total_counter,
)
from python.models.judge import topk_accuracy
from python.models.weights import load_state_into
from python.training.latents import LatentSet
from python.training.loop import optimiser_step
from python.training.losses import noise_augment
from python.training.rundir import RunDir


def heldout_rows(n: int, held: int = 1000) -> torch.Tensor:
    """Latent-cache rows kept out of the classifier's training: the last `held` originals and their mirror
    images (the cache stores all originals, then all mirrors)."""
    half = n // 2
    held = min(held, max(half // 10, 1))
    return torch.cat([torch.arange(half - held, half), torch.arange(n - held, n)])


def rows_outside(n: int, held: torch.Tensor) -> torch.Tensor:
    """The rows 0..n-1 not in `held` (the training rows), on held's device."""
    mask = torch.ones(n, dtype=torch.bool, device=held.device)
    mask[held] = False
    return mask.nonzero().squeeze(1)


def _fit_or_load(net: nn.Module, lat: LatentSet, held: torch.Tensor, steps: int, batch: int, noise: float,
                 rng: torch.Generator, run: RunDir, path, kind: str, loss) -> None:
    """`net` loaded from `path` if the run folder has it, else trained on the rows of `lat` not in `held`: one-cycle
    AdamW (lr 2e-3) over its trainable parameters, `batch` posterior samples per step with noise_augment(noise),
    loss(latents, rows) minimised. Left in eval mode, frozen."""
    if path.exists():
        load_state_into(net, path)
        run.log(f"{kind} loaded from {path}")
    else:
        train_rows = rows_outside(len(lat), held)
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.1)
        net.train()
        for _ in tqdm(range(steps), desc=kind, unit="step", dynamic_ncols=True):
            idx = train_rows[torch.randint(0, len(train_rows), (batch,), generator=rng, device=held.device)]
            loss_value = loss(noise_augment(lat.sample(idx, rng), noise, rng), idx)
            optimiser_step(loss_value, opt, sched)
    net.eval().requires_grad_(False)


def _save(net: nn.Module, path) -> None:
    """The weights as safetensors at `path`, written whole then swapped in."""
    tmp = path.parent / ".classifier.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def train_classifier(lat: LatentSet, steps: int, batch: int, seed: int, run: RunDir, noise: float = 0.0,
                     device: torch.device = torch.device("cpu"), pixels_vae=None,
                     faint: tuple[LatentSet, torch.Tensor] | None = None, faint_share: float = 0.25,
                     widths: tuple = LATENT_WIDTHS) -> nn.Module:
    """The latent classifier on real latents (posterior samples), AdamW with a one-cycle schedule; its top-k
    accuracy on held-out latents goes to metrics.jsonl (and `cls.heldout_accuracy`). Saved to the run folder
    atomically; reused if there. With `pixels_vae` (a VAE folder), a PixelClassifier reading that VAE's decoded
    images instead of the LatentClassifier. With `faint` (faint_latents' set and ghost multi-hot), each batch gains
    batch * faint_share rows of those renders, labelled with their solid objects only, so that a half-transparent
    object reads as absent; held-out figures for them (the ghost called present, the solid objects found) too."""
    cls = (PixelClassifier.from_vae(pixels_vae) if pixels_vae else
           LatentClassifier(lat.mean.shape[1], widths=widths)).to(device)
    kind = "pixel classifier" if pixels_vae else "latent classifier"
    path = run.path / "classifier.safetensors"
    held = heldout_rows(len(lat)).to(device)
    rng = torch.Generator(device=device).manual_seed(seed + 17)
    if faint is None:
        loss = lambda z, idx: F.binary_cross_entropy_with_logits(cls(z), lat.labels[idx])  # noqa: E731
    else:  # a share of every batch from the faint scenes, whose ghost is labelled absent
        ghosts, ghost_of = faint
        ghosts, ghost_of = ghosts.to(device), ghost_of.to(device)
        ghost_held = heldout_rows(len(ghosts)).to(device)
        ghost_rows, n_ghost = rows_outside(len(ghosts), ghost_held), max(1, round(batch * faint_share))

        def loss(z, idx):
            j = ghost_rows[torch.randint(0, len(ghost_rows), (n_ghost,), generator=rng, device=device)]
            zg = noise_augment(ghosts.sample(j, rng), noise, rng)
            return F.binary_cross_entropy_with_logits(cls(torch.cat([z, zg])),
                                                      torch.cat([lat.labels[idx], ghosts.labels[j]]))
    _fit_or_load(cls, lat, held, steps, batch, noise, rng, run, path, kind, loss)
    with torch.no_grad():
        logits = torch.cat([cls(lat.sample(held[i:i + 512], rng)) for i in range(0, len(held), 512)])
    cls.heldout_accuracy = float(topk_accuracy(logits, lat.labels[held]))
    figures = {"steps": steps, "heldout_latents": len(held), "accuracy": cls.heldout_accuracy}
    if faint is not None:
        with torch.no_grad():
            p = torch.cat([cls(ghosts.sample(ghost_held[i:i + 512], rng)).sigmoid()
                           for i in range(0, len(ghost_held), 512)])
        solid, ghost = ghosts.labels[ghost_held] > 0, ghost_of[ghost_held] > 0
        cls.faint_called_present = float((p[ghost] > 0.5).float().mean())
        cls.solid_beside_faint_found = float((p[solid] > 0.5).float().mean()) if solid.any() else float("nan")
        figures.update(faint_heldout_latents=len(ghost_held), faint_called_present=cls.faint_called_present,
                       solid_beside_faint_found=cls.solid_beside_faint_found)
    if not path.exists():
        run.metrics(step=0, classifier=figures)
        run.log(f"{kind}: {steps} steps, top-k accuracy {cls.heldout_accuracy:.4f} on {len(held)} held-out latents"
                + (f"; of {len(ghost_held)} held-out faint scenes' latents, the faint object called present in "
                   f"{cls.faint_called_present:.4f}, the solid ones beside it in {cls.solid_beside_faint_found:.4f}"
                   if faint is not None else ""))
        _save(cls, path)
    return cls


def count_loss(net, latents: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A CountClassifier's loss on (N, 24) object counts: the labels' binary cross-entropy (which classes are
    there) plus the cross-entropy of the total (counts above its range read as its last bin)."""
    labels, total = net(latents)
    return F.binary_cross_entropy_with_logits(labels, (counts > 0).float()) + \
        F.cross_entropy(total, counts.sum(1).clamp(max=net.max_total))


def train_count_classifier(lat: LatentSet, counts: torch.Tensor, steps: int, batch: int, seed: int, run: RunDir,
                           noise: float = 0.0, device: torch.device = torch.device("cpu"), total_only: bool = False,
                           widths: tuple = LATENT_WIDTHS) -> nn.Module:
    """The object counter (CountClassifier; with total_only, its total network alone) on real latents `lat` whose
    rows hold counts[row] objects of each class; trained and saved like train_classifier (held-out rows, one-cycle
    AdamW, reused if the run folder has it). Its held-out figures: the share of latents whose label set it reads
    exactly (p > 0.5; not with total_only), and whose total is right."""
    c_in = lat.mean.shape[1]
    net = (total_counter(c_in, widths=widths) if total_only else CountClassifier(c_in, widths=widths)).to(device)
    path = run.path / "classifier.safetensors"
    held = heldout_rows(len(lat)).to(device)
    rng = torch.Generator(device=device).manual_seed(seed + 17)
    counts = counts.to(device)
    if total_only:
        loss = lambda z, idx: F.cross_entropy(net(z), counts[idx].sum(1).clamp(max=net.max_total))  # noqa: E731
    else:
        loss = lambda z, idx: count_loss(net, z, counts[idx])  # noqa: E731
    _fit_or_load(net, lat, held, steps, batch, noise, rng, run, path, "total counter" if total_only else
                 "object counter", loss)
    with torch.no_grad():
        outs = [net(lat.sample(held[i:i + 512], rng)) for i in range(0, len(held), 512)]
    c = counts[held]
    if total_only:
        total, net.heldout_accuracy = torch.cat(outs), None
    else:
        labels, total = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        net.heldout_accuracy = float(((labels > 0) == (c > 0)).all(1).float().mean())
    net.heldout_total_accuracy = float((total.argmax(1) == c.sum(1).clamp(max=net.max_total)).float().mean())
    if not path.exists():
        run.metrics(step=0, counter={"steps": steps, "heldout_latents": len(held), "label_set": net.heldout_accuracy,
                                     "total": net.heldout_total_accuracy})
        run.log(f"object counter: {steps} steps; "
                + ("" if total_only else f"the label set right on {net.heldout_accuracy:.4f}, ")
                + f"the total right on {net.heldout_total_accuracy:.4f} of {len(held)} held-out latents")
        _save(net, path)
    return net
