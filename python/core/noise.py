"""How noise is drawn for a seed: numpy's PCG64, float32. The torch samplers and the torch-free runtime
both draw here, so the same seed gives the same images on either side (and parity can be tested)."""
from __future__ import annotations

import numpy as np


def initial_noise(seed: int, n: int, shape) -> np.ndarray:
    """x_T for n samples of the given latent shape."""
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


def step_noise(seed: int, n: int, shape):
    """noise(i) for stochastic samplers: a stream per step, independent of x_T's."""
    return lambda i: np.random.default_rng([seed, 1, i]).standard_normal((n, *shape), dtype=np.float32)


def gan_noise(seed: int, n: int, z_dim: int) -> np.ndarray:
    """The GAN generator's input noise."""
    return np.random.default_rng([seed, 2]).standard_normal((n, z_dim), dtype=np.float32)


def segments(draw, parts, *args) -> np.ndarray:
    """Noise for requests batched together: draw(seed, n, *args) per (seed, n) part, concatenated, so each
    request gets the noise it would get alone, whatever it is batched with."""
    return np.concatenate([draw(seed, n, *args) for seed, n in parts])


def step_noise_segments(parts, shape):
    streams = [step_noise(seed, n, shape) for seed, n in parts]
    return lambda i: np.concatenate([s(i) for s in streams])
