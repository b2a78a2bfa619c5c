"""Best-of-N selection: sample N candidate latents per condition, keep the one a latent classifier finds most
likely to hold exactly the requested objects.

Plain numpy, shared by the torch path (python/evaluation/generators.py) and the torch-free runtime
(runtime/generate.py).
The score of a candidate is the log-likelihood of the requested label set under the classifier's independent
sigmoid outputs, sum_j [y_j log s(l_j) + (1 - y_j) log s(-l_j)]: it rewards every requested object and
penalises every object that was not asked for (the LDM's commonest error is an extra object, which the
official top-k metric punishes only when it outranks a requested one). The classifier is
python/models/classifier.py's, trained on real latents only: neither judge takes part, so both stay fair
referees of the result. The price is N generator runs per image (the classifier itself costs ~1% of one
denoiser step): a throughput-for-accuracy trade that bench/latency.py reports as such.

Candidate k of seed s uses the noise seed `candidate_seed(s, k)`; candidate 0 is the plain sample of seed s,
so N = 1 is exactly ordinary sampling.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import UserError

SEED_STRIDE = 1_000_003  # candidate seeds of nearby user seeds never coincide (seeds are < SEED_STRIDE apart)


def candidate_seed(seed: int, k: int) -> int:
    return seed + SEED_STRIDE * k


def label_set_loglik(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(M, 24) logits and multi-hot labels -> (M,) log P(exactly this label set), with log s(x) = -log(1 + e^-x)
    computed stably."""
    sign = 2.0 * np.asarray(labels, np.float64) - 1.0
    return -np.logaddexp(0.0, -sign * np.asarray(logits, np.float64)).sum(-1)


def best_of(n: int, sample: Callable[[int], np.ndarray], logits: Callable[[np.ndarray], np.ndarray],
            cond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latents (M, ...), chosen candidate index per row (M,)). sample(k) -> candidate k's latents for every row
    of cond (drawn with candidate_seed(seed, k)); logits(latents) -> the classifier's (M, 24) logits."""
    if n < 1:
        raise UserError(f"best-of must be >= 1, got {n}")
    cond = np.asarray(cond, np.float32)
    if n == 1:
        return np.asarray(sample(0)), np.zeros(len(cond), np.int64)
    cands = np.stack([np.asarray(sample(k)) for k in range(n)])  # (n, M, ...)
    scores = np.stack([label_set_loglik(logits(c), cond) for c in cands])  # (n, M)
    pick = scores.argmax(0)
    return cands[pick, np.arange(len(cond))], pick


def best_of_latents(sample: Callable[[np.ndarray, list[tuple[int, int]]], np.ndarray], cond: np.ndarray, n: int = 1,
                    logits: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                    seeds: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Latents for multi-hot conditions, the best of n candidates per row. sample(cond, seeds) -> latents for
    rows drawn with [(seed, count), ...]: every candidate of every row in ONE call (candidate k of part (s, m) =
    m rows drawn with candidate_seed(s, k)), so a small request with best-of-N runs as one batch of N x its size,
    not N small ones. n = 1 is exactly sample(cond, seeds)."""
    if n < 1:
        raise UserError(f"best-of must be >= 1, got {n}")
    if n > 1 and logits is None:
        raise UserError("best-of-N selection needs the latent classifier (weights/classifier)")
    cond = np.asarray(cond, np.float32)
    parts = seeds or [(seed, len(cond))]
    every = sample(np.tile(cond, (n, 1)), [(candidate_seed(s, k), m) for k in range(n) for s, m in parts])
    candidates = every.reshape(n, len(cond), *every.shape[1:])
    return best_of(n, lambda k: candidates[k], logits, cond)[0]
