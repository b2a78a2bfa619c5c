import json

import numpy as np
import pytest
import torch

from python import distill_ldm
from python.core.diffusion import DDIM, DEFAULT_APG_NORM, DEFAULT_CLASS_ITERS, DEFAULT_GUIDANCE, Schedule, ddim_target
from python.core.errors import UserError
from python.models.classifier import load_class_grad
from python.models.denoiser import load_denoiser
from python.models.sampling import ldm_latents


def _traj_args(tiny_data, w, out, *extra):
    return ["trajectories", "--data", str(tiny_data), "--out", str(out), "--ldm", str(w / "ldm"),
            "--guide", str(w / "guide"), "--vae", str(w / "vae"), "--teacher-steps", "6", "--steps", "2", *extra]


def test_ddim_target_makes_one_student_step_land_on_the_teachers_point():
    sch = Schedule("cosine", prediction="v_prediction")
    ddim = DDIM(sch, 1)  # its step is set by hand to each (t, next) below
    rng = np.random.default_rng(0)
    x_t, x_next = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float64)
    for t, nxt in ((999, 499), (499, 99), (99, -1)):
        a, s = (float(c) for c in sch.coeffs(t))
        a2, s2 = (1.0, 0.0) if nxt < 0 else tuple(float(c) for c in sch.coeffs(nxt))
        out = ddim_target(x_t, x_next, a, s, a2, s2, sch.prediction)
        ddim.timesteps, ddim.prev = np.array([t]), np.array([nxt])
        np.testing.assert_allclose(ddim.step(out, 0, x_t), x_next, atol=1e-9)
    eps_sch = Schedule("cosine", prediction="epsilon")
    a, s = (float(c) for c in eps_sch.coeffs(500))
    a2, s2 = (float(c) for c in eps_sch.coeffs(300))
    out = ddim_target(x_t, x_next, a, s, a2, s2, "epsilon")
    ddim = DDIM(eps_sch, 1)
    ddim.timesteps, ddim.prev = np.array([500]), np.array([300])
    np.testing.assert_allclose(ddim.step(out, 0, x_t), x_next, atol=1e-9)


def test_student_grid_is_every_kth_teacher_step_and_refuses_what_does_not_nest():
    sch = Schedule("cosine", prediction="v_prediction")
    grid = distill_ldm.student_grid(sch, 30, 10)
    assert grid.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, -1]
    with pytest.raises(UserError, match="multiple"):
        distill_ldm.student_grid(sch, 25, 10)


def test_trajectories_follow_the_guided_teacher_and_resume(tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "traj"
    distill_ldm.main(_traj_args(tiny_data, tiny_weights, out, "--count", "5", "--shard", "3"))
    files = sorted(out.glob("paths-*.npz"))
    assert [f.name for f in files] == ["paths-00000.npz", "paths-00001.npz"]
    meta, cond, xs = distill_ldm.load_trajectories(out)
    assert xs.shape == (3, 6, 4, 16, 16) and cond.shape == (6, 24) and meta["grid"][-1] == -1
    teacher, cfg = load_denoiser(tiny_weights / "ldm")
    sch = Schedule(**cfg["schedule"])
    grad = load_class_grad(tiny_weights / "guide", tiny_weights / "vae")
    shard = np.load(files[1])
    x0 = ldm_latents(teacher, sch, shard["cond"], "ddim", 6, DEFAULT_GUIDANCE, seed=1, apg_norm=DEFAULT_APG_NORM,
                     class_grad=grad, class_scale=2.0, class_iters=DEFAULT_CLASS_ITERS).numpy()
    np.testing.assert_allclose(shard["xs"][-1], x0, atol=1e-5)  # the last kept point is the teacher's sample
    before = files[0].stat().st_mtime_ns
    distill_ldm.main(_traj_args(tiny_data, tiny_weights, out, "--count", "9", "--shard", "3"))
    assert len(list(out.glob("paths-*.npz"))) == 3 and files[0].stat().st_mtime_ns == before
    with pytest.raises(SystemExit):  # other settings into the same folder: refused in one line
        distill_ldm.main(_traj_args(tiny_data, tiny_weights, out, "--count", "3", "--shard", "3", "--guidance", "2"))


def _student_error(model, sch, cond, x0) -> float:
    """Squared error of the student's own two DDIM steps at guidance 1 (as deployed) to the teacher's x_0, from
    the paths' x_T (shard 0's seed)."""
    with torch.no_grad():
        got = ldm_latents(model, sch, cond.numpy(), "ddim", 2, 1.0, seed=0, apg_norm=0.0).numpy()
    return float(np.mean((got - x0.numpy()) ** 2))


def test_student_trains_resumes_and_saves_a_denoiser(tiny_data, tiny_weights, tmp_path):
    out, run = tmp_path / "traj", tmp_path / "run"
    distill_ldm.main(_traj_args(tiny_data, tiny_weights, out, "--count", "8", "--shard", "8"))
    common = ["train", "--data", str(tiny_data), "--trajectories", str(out), "--init", str(tiny_weights / "ldm"),
              "--vae", str(tiny_weights / "vae"), "--judge", str(tiny_weights / "judge" / "judge.safetensors"),
              "--run-dir", str(run), "--batch", "16", "--eval-conditions", "4", "--eval-every", "20",
              "--save-every", "15", "--lr", "2e-3", "--warmup", "1", "--ema", "0.5"]
    distill_ldm.main([*common, "--steps", "20"])
    distill_ldm.main([*common, "--steps", "40", "--resume"])
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"heldout_subset"' in r]
    assert [r["step"] for r in rows] == [0, 20, 40] and rows[-1]["sampler"] == "ddim"
    student, cfg = load_denoiser(run / "final")
    assert cfg["trained_steps"] == 40 and cfg["sampling"] == {"sampler": "ddim", "steps": 2, "guidance": 1.0,
                                                              "apg_norm": 0.0, "class_scale": 0.0}
    # another run can continue this student (--init RUN, e.g. on more trajectories): it starts from its EMA
    _, again, _ = distill_ldm._init_student(run)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))
    from python import ship

    ship.main(["ldm", "--run", str(run), "--out", str(tmp_path / "shipped")])  # ships as a denoiser folder
    shipped, scfg = load_denoiser(tmp_path / "shipped")
    assert scfg["sampling"] == cfg["sampling"] and scfg["trained_steps"] == 40 and "distilled_from" in scfg
    # what it learnt: its own two plain steps land nearer the guided teacher's six-step x_0 than the teacher's
    # conditional model alone does on the same two steps
    teacher, tcfg = load_denoiser(tiny_weights / "ldm")
    sch = Schedule(**tcfg["schedule"])
    _, cond, xs = distill_ldm.load_trajectories(out)
    before, after = _student_error(teacher, sch, cond, xs[-1]), _student_error(student, sch, cond, xs[-1])
    assert after < 0.5 * before, (before, after)


def test_bad_settings_are_refused_in_one_line(tiny_data, tiny_weights, tmp_path, capsys):
    with pytest.raises(SystemExit):
        distill_ldm.main(_traj_args(tiny_data, tiny_weights, tmp_path / "t", "--teacher-steps", "5"))
    assert "must be a multiple of --steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill_ldm.main(["train", "--trajectories", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")])
    assert "no teacher trajectories" in capsys.readouterr().err
