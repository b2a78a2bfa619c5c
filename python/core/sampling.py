"""The one sampling loop: guided, chunked and seeded, for any backend.

A backend is a model call on numpy arrays, `call(*inputs) -> output` (float32): a torch network through
python.models.sampling.torch_call, an ONNX Runtime session in runtime/generate.py, a Triton BLS call. Everything
else (noise from seeds, classifier-free guidance, chunks of `batch` rows, the sampler's steps) is here, once.

Seeds: `seeds=[(seed, count), ...]` covering the rows in order gives each part (a batched request, a best-of
candidate) the noise it would get alone, so an image never depends on its batch-mates.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .diffusion import (
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_GUIDANCE,
    Schedule,
    check_apg_norm,
    check_class_iters,
    check_class_scale,
    guide,
    guide_class,
    guide_outputs,
    make_sampler,
    sample_loop,
)
from .errors import UserError
from .labels import NUM_CLASSES
from .noise import gan_noise, initial_noise, segments, step_noise_segments

ModelCall = Callable[..., np.ndarray]


def seed_parts(n: int, seed: int = 0, seeds: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """[(seed, count), ...] covering n rows: `seeds` as given (checked), else one seed for all."""
    parts = seeds or [(seed, n)]
    if sum(count for _, count in parts) != n:
        raise UserError(f"seeds cover {sum(count for _, count in parts)} rows but there are {n} conditions")
    return parts


def guided(denoiser: ModelCall, cond: np.ndarray, scale: float, schedule: Schedule | None = None,
           apg_norm: float = DEFAULT_APG_NORM, class_grad: ModelCall | None = None, class_scale: float = 0.0,
           class_iters: int = DEFAULT_CLASS_ITERS):
    """denoise(x, t) for sample_loop: the conditional and unconditional passes of guidance batched into one
    denoiser(x, t, cond) call (scale 1: the conditional pass alone). apg_norm (needs `schedule`): adaptive projected
    guidance with that norm cap (diffusion.guide_outputs) in place of classifier-free guidance (0). class_scale > 0
    (needs `schedule` and class_grad(latents, cond) -> the gradient of a latent classifier's loss): classifier
    guidance on the guided prediction's x_0 (diffusion.guide_class), class_iters descent steps per sampler step."""
    if check_apg_norm(apg_norm) and schedule is None:
        raise ValueError("adaptive projected guidance needs the schedule")
    if check_class_scale(class_scale) and (schedule is None or class_grad is None):
        raise ValueError("classifier guidance needs the schedule and the classifier's gradient")
    check_class_iters(class_iters)
    n = len(cond)
    both = np.concatenate([cond, np.zeros_like(cond)]) if scale != 1.0 else cond

    def denoise(x, t):
        x_in = np.concatenate([x, x]) if scale != 1.0 else x
        out = denoiser(x_in.astype(np.float32, copy=False), np.full(len(x_in), t, np.int64), both)
        projected = apg_norm and scale != 1.0
        if projected or class_scale:
            a, s = (float(c) for c in schedule.coeffs(t))
        if scale == 1.0:
            g = out
        elif projected:
            g = guide_outputs(out[:n], out[n:], scale, x, a, s, schedule.prediction, apg_norm)
        else:
            g = guide(out[:n], out[n:], scale)
        if class_scale:
            g = guide_class(g, x, a, s, schedule.prediction, lambda x0: class_grad(x0, cond), class_scale,
                            class_iters)
        return g

    return denoise


def diffusion_latents(denoiser: ModelCall, schedule: Schedule, cond, latent_shape, sampler: str = "dpmpp",
                      steps: int = 20, guidance: float = DEFAULT_GUIDANCE, eta: float = 0.0, seed: int = 0,
                      seeds: list[tuple[int, int]] | None = None, batch: int = 256, x_T=None,
                      on_step=None, apg_norm: float = DEFAULT_APG_NORM, class_grad: ModelCall | None = None,
                      class_scale: float = 0.0, class_iters: int = DEFAULT_CLASS_ITERS,
                      layout_bank=None) -> np.ndarray:
    """Latents (generator scale) for multi-hot conditions (N, 24). x_T (optional) replaces the seeds' initial
    noise; on_step(i, x, rows) sees every intermediate sample of each chunk (the denoising-process grid); apg_norm:
    adaptive projected guidance, class_grad, class_scale and class_iters: classifier guidance (see `guided`).
    layout_bank (python.core.layout.LayoutBank): a layout denoiser's placement prior; each row's places are drawn
    from its seed and join its condition (the classifier still reads the label set alone)."""
    cond = np.asarray(cond, np.float32)
    parts = seed_parts(len(cond), seed, seeds)
    if layout_bank is not None:
        cond = layout_bank.condition_rows(cond, seed, seeds)
        if class_grad is not None:
            class_grad = (lambda g: lambda x0, c: g(x0, c[:, :NUM_CLASSES]))(class_grad)
    x_T = segments(initial_noise, parts, latent_shape) if x_T is None else np.asarray(x_T, np.float32)
    noise = step_noise_segments(parts, latent_shape)
    out = []
    for start in range(0, len(cond), batch):
        rows = slice(start, start + batch)
        out.append(sample_loop(make_sampler(sampler, schedule, steps, eta), x_T[rows],
                               guided(denoiser, cond[rows], guidance, schedule, apg_norm, class_grad,
                                      class_scale, class_iters),
                               noise=lambda i, rows=rows: noise(i)[rows],
                               on_step=(lambda i, x, rows=rows: on_step(i, x, rows)) if on_step else None))
    return np.concatenate(out).astype(np.float32, copy=False)


def one_step_latents(generator: ModelCall, cond, z_dim: int, seed: int = 0,
                     seeds: list[tuple[int, int]] | None = None, batch: int = 1024,
                     layout_bank=None) -> np.ndarray:
    """Latents of a one-call generator(z, cond) (the GAN path), in chunks of `batch` rows. layout_bank: a layout
    generator's placement prior, drawn from as diffusion_latents draws it (the same places for the same seed)."""
    cond = np.asarray(cond, np.float32)
    if layout_bank is not None:
        cond = layout_bank.condition_rows(cond, seed, seeds)
    z = segments(gan_noise, seed_parts(len(cond), seed, seeds), z_dim)
    return np.concatenate([generator(z[i:i + batch], cond[i:i + batch]) for i in range(0, len(cond), batch)])
