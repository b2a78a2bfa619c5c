"""Image figures with torch: the judge's unrequested and missing objects, within-condition spread."""
from __future__ import annotations

import numpy as np
import torch

from python.core.diffusion import DEFAULT_APG_NORM
from python.models.judge import judge_probs, judge_score
from python.models.sampling import decode, ldm_latents


def object_rates(judge, images: torch.Tensor, labels) -> dict:
    """With the judge's reading (p > 0.5): the share of images holding an object that was not asked for
    ("unrequested"; the top-k metric never looks beyond k, so an extra object costs accuracy only when it outranks
    a requested one), and the share of requested objects it does not see ("missing")."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    seen = judge_probs(judge, images) > 0.5
    asked = labels > 0.5
    return {"unrequested": float((seen & ~asked).any(1).float().mean()),
            "missing": float((~seen & asked).sum() / asked.sum())}


def spread(feats: torch.Tensor, groups: int) -> float:
    """Mean pairwise L2 distance within each group of rows (groups of equal size), averaged over groups."""
    f = feats.reshape(groups, -1, feats.shape[-1])
    d = torch.cdist(f, f)
    k = f.shape[1]
    return float(d.sum((1, 2)).div(k * (k - 1)).mean())


def ldm_probe(model, schedule, decoder, judge, cond, steps: int, guidance: float, device, seed: int = 0,
              apg_norm: float = DEFAULT_APG_NORM, sampler: str = "dpmpp"):
    """The LDM trainers' held-out figure: `model`'s samples for `cond` (`sampler`, default DPM-Solver++, `steps`,
    `guidance` with `apg_norm`, noise `seed`) decoded and read by the judge. Returns ({accuracy, by_objects,
    unrequested}, the images)."""
    images = decode(decoder, ldm_latents(model, schedule, cond, sampler, steps, guidance, seed=seed, device=device,
                                         apg_norm=apg_norm))
    res = judge_score(judge, images, cond)
    return {"accuracy": res["accuracy"], "by_objects": res["by_objects"],
            "unrequested": object_rates(judge, images, cond)["unrequested"]}, images
