"""The object counter (renders with repeated classes, CountClassifier, train_classifier --counts) and the LDM's
fine-tune through its own sampler against it (python/tune_ldm.py); the count scenes in the LDM's own training
(train_ldm --count-scenes)."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from python.core.diffusion import DEFAULT_COUNT_WEIGHT, DPMSolverPP, Schedule, guide
from python.core.errors import UserError
from python.core.sampling import diffusion_latents
from python.data.synthetic import render_count_arrays
from python.models.classifier import (
    CountClassifier,
    LatentClassifier,
    load_class_grad,
    load_classifier,
    load_classifier_for,
    save_classifier,
)
from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser, save_denoiser
from python.models.sampling import torch_call
from python.models.vae import vae_digest
from python.ship import main as ship
from python.train_classifier import main as train_classifier
from python.training.latents import load_latents
from python.training.losses import count_reward
from python.tune_ldm import main as tune_ldm
from python.tune_ldm import sample_with_grad


def test_count_renders_repeat_classes_and_count_them():
    images, counts = render_count_arrays(3, 6, lo=2, hi=4, repeat=1.0, workers=1)
    assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8 and counts.shape == (len(images), 24)
    # repeat 1: every object after the first is a copy of an earlier class, so one class holds them all
    assert len(images) >= 4 and ((counts > 0).sum(1) == 1).all() and (2 <= counts.sum(1)).all()
    assert (counts.sum(1) <= 4).all()
    again = render_count_arrays(3, 6, lo=2, hi=4, repeat=1.0, workers=1)
    assert np.array_equal(images, again[0]) and np.array_equal(counts, again[1])  # each scene from its own stream
    # (workers > 1 forks: not from a test process whose torch threads are running, where a forked child can hang)
    with pytest.raises(UserError, match="lo <= hi"):
        render_count_arrays(0, 2, lo=3, hi=2)


def _counter(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("counter")
    train_classifier(["--counts", "30", "--workers", "1", "--steps", "3", "--batch", "8", "--vae", str(parts / "vae"),
                      "--run-dir", str(folder / "run"), "--out", str(folder / "out")])
    return folder


@pytest.fixture(scope="module")
def counter_dir(parts, tmp_path_factory):
    return _counter(parts, tmp_path_factory)


def test_train_classifier_counts_trains_and_saves_an_object_counter(counter_dir, parts):
    cfg = json.loads((counter_dir / "out" / "config.json").read_text())
    assert cfg["output"] == "counts" and cfg["scenes"] == 30 and 0 <= cfg["heldout_total_accuracy"] <= 1
    assert (counter_dir / "run" / "count-latents.npz").exists()  # a rerun skips the rendering
    net = load_classifier_for(counter_dir / "out", parts / "vae", output="counts")
    labels, total = net(torch.randn(3, 4, 16, 16))
    assert isinstance(net, CountClassifier) and labels.shape == (3, 24) and total.shape == (3, 6)
    with pytest.raises(UserError, match="classifier of counts, but labels are needed"):
        load_classifier_for(counter_dir / "out", parts / "vae")  # a label classifier's users refuse it
    with pytest.raises(SystemExit):
        train_classifier(["--counts", "5", "--run-dir", str(counter_dir / "bad")])


def test_total_only_trains_the_guidances_total_counter(counter_dir, parts, tmp_path):
    """--total-only: the total network alone, at the widths asked for, reusing the run folder's renders; it is what
    classifier guidance's count term loads from guide/counter, and a label classifier's users refuse it."""
    run = tmp_path / "run"
    run.mkdir()
    os.link(counter_dir / "run" / "count-latents.npz", run / "count-latents.npz")  # the same 30 scenes, not rendered
    train_classifier(["--counts", "30", "--total-only", "--widths", "8", "8", "16", "--workers", "1", "--steps", "3",
                      "--batch", "8", "--vae", str(parts / "vae"), "--run-dir", str(run),
                      "--out", str(tmp_path / "out")])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["output"] == "total" and cfg["widths"] == [8, 8, 16] and "heldout_accuracy" not in cfg
    assert 0 <= cfg["heldout_total_accuracy"] <= 1
    net = load_classifier_for(tmp_path / "out", parts / "vae", output="total")
    assert net(torch.randn(3, 4, 16, 16)).shape == (3, 6) and net.max_total == 5
    with pytest.raises(UserError, match="classifier of total, but labels are needed"):
        load_classifier_for(tmp_path / "out", parts / "vae")
    with pytest.raises(SystemExit):
        train_classifier(["--total-only", "--run-dir", str(tmp_path / "bad")])  # no renders to count
    # classifier guidance: the label term from guide/, the count term from guide/counter (where count_weight > 0)
    guide = tmp_path / "guide"
    save_classifier(LatentClassifier(4).eval(), guide, {"vae_sha": vae_digest(parts / "vae")})
    alone = load_class_grad(guide, parts / "vae")
    assert alone.total is None and alone.count_weight == 0.0  # no counter there: the label term alone
    shutil.copytree(tmp_path / "out", guide / "counter")
    grad = load_class_grad(guide, parts / "vae")
    assert grad.total is not None and grad.count_weight == DEFAULT_COUNT_WEIGHT
    assert load_class_grad(guide, parts / "vae", count_weight=0.0).total is None
    with pytest.raises(UserError, match="count weight must be"):
        load_class_grad(guide, parts / "vae", count_weight=-1.0)
    shutil.rmtree(guide / "counter")
    shutil.copytree(counter_dir / "out", guide / "counter")  # a labels-and-total counter is not the count term's
    with pytest.raises(UserError, match="classifier of counts, but total are needed"):
        load_class_grad(guide, parts / "vae")


class _Fixed(torch.nn.Module):
    """A counter that reads `counts` (N, 24) off nothing: sharp logits at those classes and at their total."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def forward(self, x):
        labels = torch.where(self.counts > 0, 8.0, -8.0)
        total = torch.full((len(x), 6), -8.0).scatter(1, self.counts.sum(1, keepdim=True).clamp(max=5), 8.0)
        return labels, total


def test_count_reward_is_low_for_exactly_the_set_and_high_for_extras_and_repeats():
    cond = torch.zeros(1, 24)
    cond[0, [3, 9]] = 1
    exact = cond.long()
    extra = exact.clone()
    extra[0, 4] = 1  # an object nobody asked for
    twice = exact.clone()
    twice[0, 3] = 2  # a requested class drawn twice
    missing = exact.clone()
    missing[0, 9] = 0
    r = {k: count_reward(_Fixed(c), torch.zeros(1), cond).item()
         for k, c in (("exact", exact), ("extra", extra), ("twice", twice), ("missing", missing))}
    assert r["exact"] < 0.01 and min(r["extra"], r["twice"], r["missing"]) > 1.0, r
    # the weights say which part counts: without the total and the absent classes an extra object costs nothing,
    # and without the total a requested class drawn twice costs nothing
    assert count_reward(_Fixed(extra), torch.zeros(1), cond, absent=0.0, total=0.0).item() < 0.01
    assert count_reward(_Fixed(twice), torch.zeros(1), cond, total=0.0).item() < 0.01


def _perturbed(make, scale: float = 0.05):
    """make() with seed 0 and its weights nudged by Gaussian noise of `scale`: an untrained network whose output
    depends on its inputs (a zero-initialised output layer would not)."""
    torch.manual_seed(0)
    net = make()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


def _denoiser():
    return _perturbed(lambda: Denoiser(DenoiserConfig(in_channels=4, width=32, depth=2, heads=2, pooled=False)))


def test_sample_with_grad_is_the_deployed_sampler_and_reaches_every_step():
    model = _denoiser()
    sch = Schedule("cosine", prediction="v_prediction")
    cond = torch.zeros(2, 24)
    cond[0, 3] = cond[1, [5, 17]] = 1
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = diffusion_latents(torch_call(model), sch, cond.numpy(), (4, 16, 16), "dpmpp", 3, 4.0, x_T=x_T.numpy())
    seen = []
    model.patchify.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    out = sample_with_grad(model.eval(), sch, cond, x_T.requires_grad_(True), 3, 4.0)
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-4)  # the numpy loop the runtime runs
    out.square().mean().backward()
    assert len(seen) == 3 and x_T.grad.abs().sum() > 0  # a gradient through each step's denoiser call, to x_T
    assert model.patchify.weight.grad.abs().sum() > 0
    # detached inputs: the same samples, a gradient still reaching the weights at every step, but none through the
    # network's Jacobian in x (x_T's gradient is then the sampler's linear path alone)
    full_grad, x_T.grad = x_T.grad.clone(), None
    model.zero_grad()
    out = sample_with_grad(model, sch, cond, x_T, 3, 4.0, detach_inputs=True)
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-4)
    out.square().mean().backward()
    assert len(seen) == 6 and model.patchify.weight.grad.abs().sum() > 0
    assert not torch.allclose(x_T.grad, full_grad)


def test_sample_with_grad_measures_the_drift_from_a_reference_along_its_own_chain():
    model = _denoiser().eval()
    sch = Schedule("cosine", prediction="v_prediction")
    cond = torch.zeros(2, 24)
    cond[0, 3] = cond[1, [5, 17]] = 1
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # classifier-free: guide by hand below
    plain = sample_with_grad(model, sch, cond, x_T, 3, 4.0, apg_norm=0.0)
    same = copy.deepcopy(model).requires_grad_(False)
    out, drift = sample_with_grad(model, sch, cond, x_T, 3, 4.0, reference=same, apg_norm=0.0)
    assert torch.equal(out, plain) and drift.item() == 0  # the reference changes nothing the chain computes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out, drift = sample_with_grad(model, sch, cond, x_T, 3, 4.0, reference=same, apg_norm=0.0)
    # by hand: the mean over the 3 steps of the mean squared difference of both passes' outputs at the chain's x_t
    want, x, sampler = 0.0, x_T, DPMSolverPP(sch, 3)
    both = torch.cat([cond, torch.zeros_like(cond)])
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps):
            tt = torch.full((4,), int(t), dtype=torch.long)
            a, b = model(torch.cat([x, x]), tt, both), same(torch.cat([x, x]), tt, both)
            want += (a - b).square().mean().item() / 3
            x = sampler.step(guide(a[:2], a[2:], 4.0), i, x)
    assert drift.item() == pytest.approx(want, rel=1e-4) and drift.item() > 0
    drift.backward()  # differentiable in the model, not in the frozen reference
    assert model.patchify.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in same.parameters())


def _init_ldm(parts, folder):
    sch = Schedule("cosine", prediction="v_prediction")
    save_denoiser(_denoiser(), folder, {"schedule": sch.config(), "vae_sha": vae_digest(parts / "vae")})
    return folder


def _tune_args(tiny_data, parts, init, counter, run, *extra):
    return ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--init", str(init),
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--counter", str(counter), "--run-dir", str(run),
            *extra]


def test_tune_ldm_lowers_the_reward_resumes_and_ships(tiny_data, parts, counter_dir, tmp_path):
    init = _init_ldm(parts, tmp_path / "init")
    counter = counter_dir / "out"
    run = tmp_path / "run"
    tune_ldm(_tune_args(tiny_data, parts, init, counter, run, "--steps", "2", "--kl-weight", "1"))
    assert (run / "latest").read_text().strip() == "ckpt-00000002"
    tune_ldm(_tune_args(tiny_data, parts, init, counter, run, "--steps", "4", "--kl-weight", "1", "--resume"))
    assert "resumed at step 2" in (run / "log.txt").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "heldout_subset" in m] == [2, 4]
    assert all(np.isfinite(m["reward"]) and np.isfinite(m["anchor"]) for m in metrics if "reward" in m)
    assert any(m["drift"] > 0 for m in metrics if "drift" in m)  # the weights moved away from --init
    with pytest.raises(SystemExit):  # a resume that changes the run
        tune_ldm(_tune_args(tiny_data, parts, init, counter, run, "--steps", "6", "--resume", "--lr", "1e-3"))
    ship(["ldm", "--run", str(run), "--out", str(tmp_path / "shipped")])
    assert load_denoiser(tmp_path / "shipped")[1]["trained_steps"] == 4

    # the reward alone, at a learning rate that moves a tiny model: the counter's loss on fixed noise falls (a
    # counter trained for 3 steps reads everything alike; a perturbed one has gradients to follow)
    net = _perturbed(lambda: CountClassifier(4), 0.1).eval()
    counter = tmp_path / "sensitive"
    save_classifier(net, counter, {"vae_sha": vae_digest(parts / "vae")})
    net = load_classifier(counter)[0]
    sch = Schedule("cosine", prediction="v_prediction")
    cond = torch.zeros(8, 24)
    for i in range(8):
        cond[i, [i, (i * 5 + 3) % 24]] = 1
    x_T = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(5))

    def reward(folder):
        with torch.no_grad():
            return count_reward(net, sample_with_grad(load_denoiser(folder)[0], sch, cond, x_T, 2, 4.0), cond).item()

    tuned = tmp_path / "tuned"
    tune_ldm(_tune_args(tiny_data, parts, init, counter, tuned, "--steps", "12", "--lr", "3e-3",
                        "--anchor-weight", "0", "--batch", "8", "--eval-every", "12", "--save-every", "12"))
    assert reward(tuned / "final") < reward(init) - 1e-3


def test_tune_ldm_refuses_bad_inputs_before_the_run_folder(tiny_data, parts, tmp_path):
    init = _init_ldm(parts, tmp_path / "init")
    labels = tmp_path / "labels"
    save_classifier(_label_classifier(), labels,
                    {"vae_sha": vae_digest(parts / "vae")})
    with pytest.raises(SystemExit):  # a label classifier is not a counter
        tune_ldm(_tune_args(tiny_data, parts, init, labels, tmp_path / "r1"))
    with pytest.raises(SystemExit):
        tune_ldm(_tune_args(tiny_data, parts, init, labels, tmp_path / "r2", "--absent-weight", "-1"))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def _label_classifier():
    from python.models.classifier import LatentClassifier

    return LatentClassifier(4).eval()


def test_mixed_batch_takes_its_share_from_the_extra_set_and_is_unchanged_without_one():
    from python.training.latents import LatentSet, mixed_batch

    lat = LatentSet(torch.zeros(10, 4, 2, 2, dtype=torch.float16), torch.zeros(10, 4, 2, 2, dtype=torch.float16),
                    torch.eye(24)[:10], 1.0)
    extra = LatentSet(torch.ones(6, 4, 2, 2, dtype=torch.float16), torch.zeros(6, 4, 2, 2, dtype=torch.float16),
                      2 * torch.eye(24)[:6], 1.0)
    z0, labels = mixed_batch(lat, extra, 8, 3, torch.Generator().manual_seed(0))
    assert z0.shape == (8, 4, 2, 2) and (z0[:5] == 0).all() and (z0[5:] == 1).all()
    assert labels[:5].max() == 1 and (labels[5:].max(1).values == 2).all()  # the extra rows carry their counts
    # no extra rows: exactly the draws of the plain batch (a run without count scenes is the run it always was)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    idx = torch.randint(0, 10, (8,), generator=g2)
    plain = lat.sample(idx, g2), lat.labels[idx]
    for a, b in zip(mixed_batch(lat, extra, 8, 0, g1), plain):
        assert torch.equal(a, b)


def test_train_ldm_mixes_in_count_scenes_conditioned_on_their_counts(counter_dir, tiny_data, parts, tmp_path,
                                                                     monkeypatch, capsys):
    import python.train_ldm as module
    from python.train_ldm import main as train_ldm

    seen, loss = [], module.diffusion_loss
    monkeypatch.setattr(module, "diffusion_loss", lambda net, z0, cond, *a: seen.append(cond.clone()) or
                        loss(net, z0, cond, *a))

    run = tmp_path / "run"
    run.mkdir()
    # the counter's rendered scenes (30, seed 0, this VAE) are the same file a run asking for them would write
    (run / "count-latents.npz").write_bytes((counter_dir / "run" / "count-latents.npz").read_bytes())
    base = ["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--no-bf16",
            "--judge", str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run), "--steps", "2"]
    count = ["--pooled", "--count-scenes", "30", "--count-seed", "0", "--count-fraction", "0.5", "--count-workers", "1"]
    train_ldm(base + count)
    log = (run / "log.txt").read_text()
    assert "rendered scenes' latents read from" in log and "4 of each 8 from 60 count-scene latents" in log
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["count_scenes"] == {"scenes": 30, "seed": 0, "fraction": 0.5} and cfg["denoiser"]["pooled"]
    # the denoiser saw the count scenes' counts in the second half of each batch, the official label sets in the first
    counts = {tuple(r) for r in np.load(run / "count-latents.npz")["counts"].tolist()}
    official = {tuple(r) for r in load_latents(tiny_data, parts / "vae").labels.long().tolist()}
    assert len(seen) == 2 and max(c.sum(1).max() for c in seen) > 0
    for cond in seen:
        rows = cond.long().tolist()
        assert all(tuple(r) in official or not any(r) for r in rows[:4])  # (an all-zero row: the dropped condition)
        assert all(tuple(r) in counts or not any(r) for r in rows[4:])
    with pytest.raises(SystemExit):  # a resume that changes the mixture is refused
        train_ldm(base + count[:-4] + ["--count-fraction", "0.25", "--resume"])
    assert "count_scenes was" in capsys.readouterr().err
    # a file of other scenes is refused, not silently used
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "count-latents.npz").write_bytes((run / "count-latents.npz").read_bytes())
    with pytest.raises(SystemExit):
        train_ldm(base[:-3] + [str(tmp_path / "r3"), "--steps", "2", *count[:2], "31", *count[3:]])
    assert "holds the latents of scenes 30 seed 0" in capsys.readouterr().err
    # without the pooled embedding a count cannot reach the network: refused before any folder exists
    with pytest.raises(SystemExit):
        train_ldm(base[:-3] + [str(tmp_path / "r2"), "--steps", "2", "--no-pooled", "--count-scenes", "30"])
    assert "needs --pooled" in capsys.readouterr().err and not (tmp_path / "r2").exists()
