"""Exponential moving average of weights, shared by the LDM and GAN trainers."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, with decay warming up as (1 + step) / (10 + step) so early
    averages are not dominated by the random initialisation; buffers (batch-norm statistics) are copied."""
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)  # one kernel
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
