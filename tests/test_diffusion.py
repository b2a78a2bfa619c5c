"""Each sampler step against diffusers' scheduler with the same model outputs, in float64."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from python.core.diffusion import (
    DDIM,
    DDPM,
    DPMSolverPP,
    Schedule,
    add_noise,
    check_apg_norm,
    guide,
    guide_outputs,
    guide_projected,
    make_sampler,
    output_from_x0,
    sample_loop,
    target,
    x0_eps,
)
from python.core.errors import UserError

DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def _fake_model(sch):
    """A deterministic stand-in for a trained denoiser: it predicts x_0 = 0.8 tanh(x_t) (bounded, smooth) and
    outputs the matching epsilon or v, so samples stay O(1) as with a real network."""
    def model(x, t):
        a, s = (float(c) for c in sch.coeffs(t))
        x0 = 0.8 * np.tanh(x)
        eps = (x - a * x0) / s
        return eps if sch.prediction == "epsilon" else a * eps - s * x0
    return model


def _float64(ref, sch):
    """diffusers keeps alphas_cumprod (and DPM-Solver's sigmas) in float32; give it the exact float64 values so
    the comparison measures the update rules, not float32 rounding near alpha_bar = 1."""
    ref.betas = torch.from_numpy(sch.betas)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.from_numpy(sch.alpha_bar)
    return ref


def _set_timesteps(ref, steps):
    ref.set_timesteps(steps)
    if isinstance(ref, DPMSolverMultistepScheduler):  # undo the float32 cast of set_timesteps
        ac = ref.alphas_cumprod.numpy()[ref.timesteps.numpy()]
        ref.sigmas = torch.from_numpy(np.concatenate([((1 - ac) / ac) ** 0.5, [0.0]]))
    return ref


def _compare(ours, theirs, noise_seed=0):
    """Max abs difference over all steps; each step starts both from the same sample and model output."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    rng = np.random.default_rng(noise_seed)
    x = rng.standard_normal((2, 4, 8, 8))
    model = _fake_model(ours.sch)
    assert np.array_equal(ours.timesteps, theirs.timesteps.numpy())
    worst = 0.0
    for i, t in enumerate(ours.timesteps):
        out = model(x, t)
        z = rng.standard_normal(x.shape)
        kwargs = {}
        if isinstance(ours, DDIM):
            kwargs = {"eta": ours.eta, "variance_noise": torch.from_numpy(z)}
        real = ddpm_module.randn_tensor
        ddpm_module.randn_tensor = lambda *a, **k: torch.from_numpy(z)  # DDPMScheduler draws its own noise
        try:
            ref = theirs.step(torch.from_numpy(out), int(t), torch.from_numpy(x.copy()), **kwargs).prev_sample
        finally:
            ddpm_module.randn_tensor = real
        x = ours.step(out, i, x, z)
        worst = max(worst, float(np.abs(x - ref.numpy()).max()))
    return worst


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_matches_diffusers(kind, prediction):
    sch = Schedule(kind, prediction=prediction, beta_start=1e-4, beta_end=0.02)
    ref = DDPMScheduler(num_train_timesteps=1000, trained_betas=sch.betas, prediction_type=prediction,
                        clip_sample=False)
    _float64(ref, sch)
    for steps in (1000, 50):
        _set_timesteps(ref, steps)
        assert _compare(DDPM(sch, steps), ref) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_matches_diffusers(kind, prediction, eta, spacing):
    sch = Schedule(kind, prediction=prediction)
    ref = DDIMScheduler(num_train_timesteps=1000, trained_betas=sch.betas, prediction_type=prediction,
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    _float64(ref, sch)
    for steps in (10, 25, 50):
        _set_timesteps(ref, steps)
        assert _compare(DDIM(sch, steps, eta, spacing), ref) <= 1e-5


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 30, 1000])
def test_ddim_trailing_starts_at_the_last_timestep_and_walks_its_own_grid(steps):
    """Where n does not divide T, diffusers steps each t to t - T//n, off its own grid; ours goes to the next
    timestep, so a deterministic DDIM run is exactly the chain x_T -> x_{t_1} -> ... -> x_0."""
    sch = Schedule("cosine", prediction="v_prediction")
    ddim = DDIM(sch, steps)
    ts = ddim.timesteps
    assert ts[0] == sch.T - 1 and len(ts) == steps and np.all(np.diff(ts) < 0) and ts[-1] >= 0
    assert np.array_equal(ddim.prev[:-1], ts[1:]) and ddim.prev[-1] == -1
    assert np.all(np.abs(np.diff(ts) + sch.T / steps) <= 1)  # evenly spaced, to rounding
    # the update with the true x_0 and eps lands exactly on the next marginal (x_0 itself at the end)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 2, 3, 4, 4))
    for i, t in enumerate(ts):
        a, s = (float(c) for c in sch.coeffs(int(t)))
        out = target(x0, eps, a, s, "v_prediction")
        got = ddim.step(out, i, add_noise(x0, eps, a, s))
        p = int(ddim.prev[i])
        want = x0 if p < 0 else add_noise(x0, eps, *(float(c) for c in sch.coeffs(p)))
        assert np.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="valid: trailing, leading"):
        DDIM(sch, 10, spacing="linspace")


def test_ddim_grids_hold_n_distinct_timesteps_for_every_n():
    """Float arange overshoots for some n (61, 103, ...: an extra t = -1, which would read alpha_bar[-1])."""
    sch = Schedule("cosine", prediction="v_prediction")
    for spacing in ("trailing", "leading"):
        for n in range(1, sch.T + 1):
            ts = DDIM(sch, n, spacing=spacing).timesteps
            assert len(ts) == n and ts[-1] >= 0 and ts[0] <= sch.T - 1 and np.all(np.diff(ts) < 0), (spacing, n)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 10, 20, 25])
def test_dpmsolver_pp_2m_matches_diffusers(kind, prediction, steps):
    sch = Schedule(kind, prediction=prediction)
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=sch.betas, prediction_type=prediction,
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
    _set_timesteps(_float64(ref, sch), steps)
    assert _compare(DPMSolverPP(sch, steps), ref) <= 1e-5


def test_schedule_and_targets_are_consistent():
    sch = Schedule("cosine", prediction="v_prediction")
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 3, 4, 4))
    for t in (0, 10, 500, 999):
        a, s = (float(c) for c in sch.coeffs(t))
        assert a * a + s * s == pytest.approx(1.0)
        xt = add_noise(x0, eps, a, s)
        for pred in ("epsilon", "v_prediction"):
            rec_x0, rec_eps = x0_eps(xt, target(x0, eps, a, s, pred), a, s, pred)
            assert np.allclose(rec_eps, eps) and np.allclose(rec_x0, x0, atol=1e-6 / max(a, 1e-3))
    assert sch.alpha_bar[-1] < 1e-4 and np.all(np.diff(sch.alpha_bar) < 0)


def test_same_maths_on_torch_and_numpy():
    sch = Schedule("linear")
    model = _fake_model(sch)
    x = np.random.default_rng(2).standard_normal((1, 4, 4, 4))
    for name in ("ddim", "dpmpp", "ddpm"):
        a = sample_loop(make_sampler(name, sch, 10), x, model, noise=lambda i: np.full(x.shape, 0.1))
        b = sample_loop(make_sampler(name, sch, 10), torch.from_numpy(x),
                        lambda x, t: torch.from_numpy(model(x.numpy(), t)),
                        noise=lambda i: torch.full(x.shape, 0.1, dtype=torch.float64))
        assert np.abs(a - b.numpy()).max() < 1e-12


def test_guidance_and_errors():
    assert guide(np.array(3.0), np.array(1.0), 2.0) == 5.0 and guide(np.array(3.0), np.array(1.0), 1.0) == 3.0
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", Schedule(), 10)
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        make_sampler("ddim", Schedule(), 0)
    with pytest.raises(ValueError, match="unknown prediction"):
        Schedule(prediction="x0")


def test_adaptive_projected_guidance_drops_the_parallel_part_and_caps_the_norm():
    rng = np.random.default_rng(4)
    xc, xu = rng.standard_normal((2, 3, 4, 4, 4))
    per = lambda x: (x.reshape(len(x), -1)).sum(1)  # noqa: E731
    for norm in (np.inf, 2.0, 0.5):
        g = guide_projected(xc, xu, 4.0, norm)
        update = (g - xc) / 3.0  # (scale - 1) times the kept part of the update
        # orthogonal to the conditional prediction, sample by sample
        assert np.abs(per(update * xc)).max() < 1e-10
        # never longer than the capped update; uncapped it is exactly the update's orthogonal part
        d = xc - xu
        if np.isinf(norm):
            unit = xc / np.sqrt(per(xc * xc))[:, None, None, None]
            want = d - per(d * unit)[:, None, None, None] * unit
            assert np.allclose(update, want, atol=1e-12)
        assert (np.sqrt(per(update * update)) <= min(norm, np.sqrt(per(d * d)).max()) + 1e-9).all()
    # a cap that binds: each sample's update shrinks to that norm before the projection (one sample kept short)
    xu2 = xc - 1e-3 * rng.standard_normal(xc.shape)
    g = guide_projected(xc, np.concatenate([xu[:2], xu2[2:]]), 2.0, 0.5)
    lengths = np.sqrt(per((g - xc) ** 2))
    assert (lengths[:2] < 0.5 + 1e-9).all() and lengths[2] < 0.05
    # scale 1 is the conditional prediction; torch and numpy agree
    assert np.allclose(guide_projected(xc, xu, 1.0, 2.0), xc)
    t = guide_projected(torch.from_numpy(xc), torch.from_numpy(xu), 3.0, 2.0)
    assert np.allclose(t.numpy(), guide_projected(xc, xu, 3.0, 2.0), atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guided_outputs_in_the_network_s_own_terms(prediction):
    rng = np.random.default_rng(5)
    x_t, oc, ou = rng.standard_normal((3, 2, 4, 4, 4))
    a, s = 0.6, 0.8
    # output_from_x0 inverts x0_eps
    assert np.allclose(output_from_x0(x_t, x0_eps(x_t, oc, a, s, prediction)[0], a, s, prediction), oc, atol=1e-12)
    # apg_norm 0 is classifier-free guidance; otherwise the projected guidance of the two x_0 predictions
    assert np.array_equal(guide_outputs(oc, ou, 4.0, x_t, a, s, prediction, 0.0), guide(oc, ou, 4.0))
    got = x0_eps(x_t, guide_outputs(oc, ou, 4.0, x_t, a, s, prediction, 3.0), a, s, prediction)[0]
    want = guide_projected(x0_eps(x_t, oc, a, s, prediction)[0], x0_eps(x_t, ou, a, s, prediction)[0], 4.0, 3.0)
    assert np.allclose(got, want, atol=1e-12)
    assert not np.allclose(got, x0_eps(x_t, guide(oc, ou, 4.0), a, s, prediction)[0])
    for bad in (-1.0, float("nan")):
        with pytest.raises(UserError, match="apg norm must be 0"):
            check_apg_norm(bad)
    assert check_apg_norm(float("inf")) == float("inf")
