"""Image figures with torch: the judge's unrequested objects, within-condition spread."""
from __future__ import annotations

import numpy as np
import torch

from python.models.judge import judge_probs


def unrequested_rate(net, images: torch.Tensor, labels) -> float:
    """Fraction of images in which the judge sees (p > 0.5) an object that was not asked for. The top-k metric
    never looks beyond k, so an extra object costs accuracy only when it outranks a requested one."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    extra = (judge_probs(net, images) > 0.5) & (labels < 0.5)
    return float(extra.any(1).float().mean())


def spread(feats: torch.Tensor, groups: int) -> float:
    """Mean pairwise L2 distance within each group of rows (groups of equal size), averaged over groups."""
    f = feats.reshape(groups, -1, feats.shape[-1])
    d = torch.cdist(f, f)
    k = f.shape[1]
    return float(d.sum((1, 2)).div(k * (k - 1)).mean())
