"""The diffusion maths, once: noise schedules, training targets, DDPM / DDIM / DPM-Solver++(2M) steps, guidance.

Plain array arithmetic: every function takes numpy arrays or torch tensors alike (only +, -, *, /, ** and
per-sample sums and clips touch the samples), so the torch trainer and the numpy/ONNX runtime run the very same
code. The schedule itself is float64 numpy. Symbols follow the papers: alpha_bar (cumulative product
of 1 - beta), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, v = sqrt(alpha_bar_t) eps -
sqrt(1 - alpha_bar_t) x_0. Timestep spacing and update rules match diffusers' DDPMScheduler,
DDIMScheduler ("trailing" spacing by default, "leading" as an option) and DPMSolverMultistepScheduler (dpmsolver++,
order 2, midpoint, "linspace" spacing, final sigma zero); tests check each step against them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError

PREDICTIONS = ("epsilon", "v_prediction")
# The guidance used wherever none is given (trainer's evaluation, eval_gen, runtime, server, bench, the GAN path's
# teacher, C++ and Triton defaults): scale DEFAULT_GUIDANCE, as adaptive projected guidance with the update's norm
# capped at DEFAULT_APG_NORM (guide_outputs; 0 would be classifier-free guidance). Chosen by measurement on the
# shipped LDM (weights/ldm/MODEL_CARD.md, 2026-12-05): at equal accuracy it draws fewer doubled objects and a lower
# Frechet distance than classifier-free guidance at 4, the earlier default.
DEFAULT_GUIDANCE = 5.0
DEFAULT_APG_NORM = 5.0
# Classifier guidance on x_0 (guide_class) at this scale, with the shipped guidance classifier (weights/guide, a
# latent classifier trained on real latents only; neither the judges nor the best-of selector): the default of every
# path that samples images for a user (eval_gen, runtime, server, bench, C++, Triton). The trainers' probes and the
# GAN path's teacher leave it out (scale 0), so that they measure the network itself. Chosen by measurement
# (weights/ldm/MODEL_CARD.md, 2026-12-05, fourteenth session): +0.05 accuracy at the same surplus of objects.
DEFAULT_CLASS_SCALE = 2.0
# The guidance loss's count term (weights/guide/counter: "as many objects as requested"), weighted against its label
# term; the exported class_grad graph holds it (python/models/classifier.py ClassifierGradient). Chosen by measurement
# (weights/ldm/MODEL_CARD.md, fifteenth session): accuracy level, unasked objects halved, heldout FD 515 -> 101.
DEFAULT_COUNT_WEIGHT = 2.5
# Descent steps on x_0 per sampler step in classifier guidance (guide_class's `iters`; each one more class_grad call,
# the gradient taken again where the last step left x_0). Three steps (the sixteenth session's choice for the plain
# LDM, which drew a requested colour twice in half its images) overshoot on the layout LDM shipped on 2026-12-06 and
# break an image now and then; one step reads heldout FD 26 (the VAE's floor) against 71, accuracy within the seeds'
# spread (weights/ldm/MODEL_CARD.md, twenty-first session), at a third of the class_grad calls.
DEFAULT_CLASS_ITERS = 1
MAX_CLASS_ITERS = 16
SCHEDULES = ("linear", "scaled_linear", "cosine")


def betas_for(kind: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), beta capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], np.float64)
    raise ValueError(f"unknown noise schedule {kind!r}; valid: {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class Schedule:
    kind: str = "cosine"
    T: int = 1000
    prediction: str = "epsilon"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        object.__setattr__(self, "betas", betas_for(self.kind, self.T, self.beta_start, self.beta_end))
        object.__setattr__(self, "alpha_bar", np.cumprod(1.0 - self.betas))

    def coeffs(self, t):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) for integer timesteps t (scalar or array)."""
        ab = self.alpha_bar[np.asarray(t)]
        return np.sqrt(ab), np.sqrt(1.0 - ab)

    def snr(self, t):
        ab = self.alpha_bar[np.asarray(t)]
        return ab / (1.0 - ab)

    def config(self) -> dict:
        return {"kind": self.kind, "T": self.T, "prediction": self.prediction,
                "beta_start": self.beta_start, "beta_end": self.beta_end}


def add_noise(x0, eps, a, s):
    """Forward process: x_t = a x_0 + s eps, with a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) (broadcastable)."""
    return a * x0 + s * eps


def target(x0, eps, a, s, prediction: str):
    """What the network learns to output: eps, or v = a eps - s x_0."""
    return eps if prediction == "epsilon" else a * eps - s * x0


def x0_eps(x_t, out, a: float, s: float, prediction: str):
    """Network output at (x_t, t) -> predicted (x_0, eps)."""
    if prediction == "epsilon":
        return (x_t - s * out) / a, out
    x0 = a * x_t - s * out
    return x0, s * x_t + a * out


def guide(out_cond, out_uncond, scale: float):
    """Classifier-free guidance: uncond + scale * (cond - uncond) (scale 1 = plain conditional)."""
    return out_uncond + scale * (out_cond - out_uncond)


def output_from_x0(x_t, x0, a: float, s: float, prediction: str):
    """The network output that x0_eps maps to x0 at (x_t, t): the inverse of x0_eps's first half (s > 0)."""
    return (x_t - a * x0) / s if prediction == "epsilon" else (a * x_t - x0) / s


def ddim_target(x_t, x_next, a: float, s: float, a_next: float, s_next: float, prediction: str):
    """The network output with which one deterministic DDIM step from x_t (coefficients a, s) lands on x_next
    (a_next, s_next; 1, 0 at x_0): the target of progressive distillation (Salimans & Ho 2022). DDIM's step is
    x_next = a_next x_0 + s_next (x_t - a x_0) / s, solved for x_0."""
    x0 = (x_next - (s_next / s) * x_t) / (a_next - s_next * a / s)
    return output_from_x0(x_t, x0, a, s, prediction)


def check_apg_norm(value: float, name: str = "apg norm") -> float:
    """The apg_norm setting, checked: 0 (classifier-free guidance), a positive cap, or inf; `name` is the option or
    field the message names. A bad value is the user's: UserError, which the CLIs print as one line."""
    if not value >= 0:  # also refuses nan
        raise UserError(f"{name} must be 0 (classifier-free guidance), a positive norm cap or inf, got {value}")
    return float(value)


def _per_sample_sum(x):
    return x.sum(axis=tuple(range(1, x.ndim)), keepdims=True)


def guide_projected(x0_cond, x0_uncond, scale: float, norm: float = math.inf):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance
    scales in diffusion models"; their eta = 0, no momentum) on clean-latent predictions: the guidance update
    x0_cond - x0_uncond, its L2 norm per sample capped at `norm`, loses its component along x0_cond (the part that
    scales what is already drawn up); x0_cond + (scale - 1) * the rest. With norm = inf and that component kept it
    would be classifier-free guidance."""
    d = x0_cond - x0_uncond
    if math.isfinite(norm):
        d = d * (norm / (_per_sample_sum(d * d) ** 0.5).clip(min=1e-12)).clip(max=1.0)
    unit = x0_cond / (_per_sample_sum(x0_cond * x0_cond) ** 0.5).clip(min=1e-12)
    d = d - _per_sample_sum(d * unit) * unit
    return x0_cond + (scale - 1.0) * d


def guide_outputs(out_cond, out_uncond, scale: float, x_t, a: float, s: float, prediction: str,
                  apg_norm: float = 0.0):
    """Guided network output at (x_t, t) with coefficients a, s: classifier-free guidance (apg_norm 0), or
    adaptive projected guidance on the predicted x_0 with the update's norm capped at apg_norm (inf: no cap)."""
    if not apg_norm or scale == 1.0:
        return guide(out_cond, out_uncond, scale)
    x0 = guide_projected(x0_eps(x_t, out_cond, a, s, prediction)[0], x0_eps(x_t, out_uncond, a, s, prediction)[0],
                         scale, apg_norm)
    return output_from_x0(x_t, x0, a, s, prediction)


def check_class_scale(value: float, name: str = "class scale") -> float:
    """The classifier-guidance scale, checked: 0 (none) or a finite positive scale; a bad value is the user's."""
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name} must be 0 (no classifier guidance) or a positive scale, got {value}")
    return float(value)


def check_eta(value: float, name: str = "eta") -> float:
    """DDIM's noise share, checked: a number in [0, 1] (0: deterministic); a bad value is the user's."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserError(f"{name} must be between 0.0 and 1.0, got {value}")
    return float(value)


def check_class_iters(value, name: str = "class iters") -> int:
    """The number of descent steps on x_0 per sampler step, checked: a whole number in 1..MAX_CLASS_ITERS."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_CLASS_ITERS:
        raise UserError(f"{name} must be a whole number of descent steps in 1..{MAX_CLASS_ITERS}, got {value!r}")
    return int(value)


def guide_class(out, x_t, a: float, s: float, prediction: str, grad_of, scale: float, iters: int = 1):
    """Classifier guidance on the predicted x_0: the guided output's x_0 moved down the gradient of a frozen latent
    classifier's loss for the requested labels, grad_of(x_0) (python.models.classifier.ClassifierGradient), times
    `scale`, `iters` times over (each step's gradient taken where the last one left x_0); returned as the network
    output that gives that x_0 at (x_t, t). The classifier reads x_0, not x_t, so it needs no noise-level input: one
    trained on real latents (with mild noise) steers every step."""
    return output_from_x0(x_t, descend_x0(x0_eps(x_t, out, a, s, prediction)[0], grad_of, scale, iters), a, s,
                          prediction)


def descend_x0(x0, grad_of, scale: float, iters: int = 1):
    """x_0 moved `iters` times down grad_of (each gradient taken where the last step left it), `scale` per step: the
    x_0 of classifier guidance (guide_class; the GAN path's DMD teacher, python/adversarial.py, uses it directly)."""
    for _ in range(check_class_iters(iters)):
        x0 = x0 - scale * grad_of(x0)
    return x0


class DDPM:
    """Ancestral sampling (Ho et al. Algorithm 2, posterior variance beta_tilde); `steps` < T skips evenly."""

    stochastic = True

    def __init__(self, schedule: Schedule, steps: int | None = None, clip: float | None = None):
        self.sch, self.clip = schedule, clip
        n = steps or schedule.T
        self.ratio = schedule.T // n
        self.timesteps = (np.arange(n) * self.ratio)[::-1].astype(np.int64)

    def step(self, out, i: int, x_t, noise=None):
        t = int(self.timesteps[i])
        prev = t - self.ratio
        ab_t = self.sch.alpha_bar[t]
        ab_prev = self.sch.alpha_bar[prev] if prev >= 0 else 1.0
        alpha_t = ab_t / ab_prev
        beta_t = 1.0 - alpha_t
        x0, _ = x0_eps(x_t, out, math.sqrt(ab_t), math.sqrt(1 - ab_t), self.sch.prediction)
        if self.clip is not None:
            x0 = x0.clip(-self.clip, self.clip)
        mean = (math.sqrt(ab_prev) * beta_t / (1 - ab_t)) * x0 + (math.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab_t)) * x_t
        if t == 0 or noise is None:
            return mean
        var = max((1 - ab_prev) / (1 - ab_t) * beta_t, 1e-20)
        return mean + math.sqrt(var) * noise


DDIM_SPACINGS = ("trailing", "leading")


class DDIM:
    """Song et al.: x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z; eta scales sigma.

    `spacing` "trailing" (the default): steps at T-1, T-1-T/n, ... (rounded), so that sampling starts at the last
    timestep, where the initial noise is right (Lin et al. 2024, "Common diffusion noise schedules and sample steps
    are flawed"); each step goes to the next one, the last to x_0. "leading" (diffusers' DDIMScheduler default): 0,
    T//n, ..., (n-1) T//n, which starts sampling at t = T - T//n from pure noise (t = 900 at 10 steps): on the
    shipped LDM at 10 steps 0.83 accuracy against trailing's 0.90 (weights/ldm/MODEL_CARD.md, seventeenth session).
    Both match diffusers' DDIMScheduler step for step where n divides T."""

    def __init__(self, schedule: Schedule, steps: int = 50, eta: float = 0.0, spacing: str = "trailing"):
        if spacing not in DDIM_SPACINGS:
            raise ValueError(f"unknown DDIM spacing {spacing!r}; valid: {', '.join(DDIM_SPACINGS)}")
        self.sch, self.eta, self.spacing = schedule, eta, spacing
        self.stochastic = eta > 0
        T = schedule.T
        if spacing == "leading":
            ts = np.arange(steps)[::-1] * (T // steps)
        else:
            # T - i T/n, not arange(T, 0, -T/n): a float step overshoots for some n (61, 103, ...) by one t = -1
            ts = np.round(T - np.arange(steps) * (T / steps)).astype(np.int64) - 1
        self.timesteps = np.asarray(ts, dtype=np.int64)
        self.prev = np.concatenate([self.timesteps[1:], [-1]])  # where each step goes (-1: x_0, alpha_bar 1)

    def step(self, out, i: int, x_t, noise=None):
        t, prev = int(self.timesteps[i]), int(self.prev[i])
        ab_t = self.sch.alpha_bar[t]
        ab_prev = self.sch.alpha_bar[prev] if prev >= 0 else 1.0
        x0, eps = x0_eps(x_t, out, math.sqrt(ab_t), math.sqrt(1 - ab_t), self.sch.prediction)
        sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev


class DPMSolverPP:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep, data prediction, midpoint form.

    In sigma = sqrt((1 - ab) / ab) form: alpha = 1/sqrt(1 + sigma^2), lambda = log(alpha / (alpha sigma)).
    First order (DDIM-like) at the first step and at the last, which goes to sigma = 0."""

    stochastic = False

    def __init__(self, schedule: Schedule, steps: int = 20):
        self.sch = schedule
        T = schedule.T
        self.timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        sig = np.sqrt((1 - schedule.alpha_bar) / schedule.alpha_bar)
        self.sigmas = np.concatenate([sig[self.timesteps], [0.0]])
        self.x0_prev = None

    @staticmethod
    def _alpha_sigma_lambda(sigma: float):
        alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
        s = sigma * alpha
        return alpha, s, (math.log(alpha) - math.log(s)) if s > 0 else math.inf

    def step(self, out, i: int, x_t, noise=None):
        a_s0, s_s0, lam_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        a_t, s_t, lam_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        x0, _ = x0_eps(x_t, out, a_s0, s_s0, self.sch.prediction)
        last = i == len(self.timesteps) - 1
        if s_t == 0:  # h = inf: the update is x0 itself
            x_next = x0
        elif i == 0 or last or self.x0_prev is None:
            h = lam_t - lam_s0
            x_next = (s_t / s_s0) * x_t - (a_t * (math.exp(-h) - 1.0)) * x0
        else:
            _, _, lam_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])
            h, h0 = lam_t - lam_s0, lam_s0 - lam_s1
            r0 = h0 / h
            d1 = (1.0 / r0) * (x0 - self.x0_prev)
            x_next = (s_t / s_s0) * x_t - (a_t * (math.exp(-h) - 1.0)) * x0 - (0.5 * a_t * (math.exp(-h) - 1.0)) * d1
        self.x0_prev = x0
        return x_next


SAMPLERS = {"ddpm": DDPM, "ddim": DDIM, "dpmpp": DPMSolverPP}


def make_sampler(name: str, schedule: Schedule, steps: int, eta: float = 0.0):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    if not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be in 1..{schedule.T}, got {steps}")
    if name == "ddim":
        return DDIM(schedule, steps, eta)
    return SAMPLERS[name](schedule, steps)


def sample_loop(sampler, x_T, denoise, noise=None, on_step=None):
    """Run a sampler from x_T. denoise(x, t) -> network output (guidance inside); noise(i) -> fresh noise
    for stochastic samplers; on_step(i, x) sees every intermediate sample (the denoising-process grid)."""
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(denoise(x, int(t)), i, x, noise(i) if (noise and sampler.stochastic) else None)
        if on_step:
            on_step(i, x)
    return x
