"""Learning-rate schedules."""
from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int | None = None,
                  floor: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps (default: the first 2%), then cosine decay to `floor` x the base rate at
    `steps`, held there after."""
    warmup = warmup or max(1, steps // 50)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
