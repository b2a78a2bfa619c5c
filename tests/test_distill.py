import json

import numpy as np
import pytest
import torch

from python import distill
from python.core.best_of import candidate_seed
from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_GUIDANCE, Schedule
from python.core.errors import UserError
from python.core.noise import initial_noise
from python.models.denoiser import load_denoiser
from python.models.generators import load_generator, save_generator
from python.models.one_step import OneStep
from python.models.sampling import ldm_latents
from python.models.vae import Decoder, load_vae


def _pairs_args(tiny_data, w, out, *extra):
    return ["pairs", "--data", str(tiny_data), "--out", str(out), "--ldm", str(w / "ldm"), "--vae", str(w / "vae"),
            "--classifier", str(w / "classifier"), "--steps", "2", *extra]


def test_one_step_student_starts_as_the_teachers_one_call_guess(tiny_weights):
    teacher, cfg = load_denoiser(tiny_weights / "ldm")
    student = OneStep(teacher.cfg, cfg["schedule"])
    student.denoiser.load_state_dict(teacher.state_dict())
    sch = Schedule(**cfg["schedule"])
    a, s = sch.coeffs(np.array([sch.T - 1]))
    x, cond = torch.randn(3, teacher.cfg.in_channels, 16, 16), torch.zeros(3, 24)
    cond[:, [2, 9]] = 1
    with torch.no_grad():
        expect = float(a[0]) * x - float(s[0]) * teacher(x, torch.full((3,), sch.T - 1), cond)
        torch.testing.assert_close(student(x.flatten(1), cond), expect)
    assert student.cfg.z_dim == x[0].numel()
    with pytest.raises(UserError, match="v-prediction"):
        OneStep(teacher.cfg, Schedule("cosine", prediction="epsilon").config())


def test_teacher_pairs_are_the_samplers_output_and_resume(tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "pairs"
    distill.main(_pairs_args(tiny_data, tiny_weights, out, "--count", "6", "--shard", "4"))
    files = sorted(out.glob("pairs-*.npz"))
    assert [f.name for f in files] == ["pairs-00000.npz", "pairs-00001.npz"]  # 6 pairs in shards of 4: two shards
    meta, pairs = distill.load_pairs(out)
    assert meta["best_of"] == 1 and pairs["x_T"].shape == (8, 4, 16, 16) and pairs["x_0"].shape == (8, 4, 16, 16)
    train_sets = {tuple(r) for r in distill.training_label_sets(tiny_data)}
    assert all(tuple(r) in train_sets for r in pairs["cond"].numpy())  # the teacher is asked for training label sets
    teacher, cfg = load_denoiser(tiny_weights / "ldm")
    shard = np.load(files[1])
    seed = 0 * 1_000_000 + 1
    np.testing.assert_allclose(shard["x_T"], initial_noise(seed, 4, (4, 16, 16)), atol=2e-3)  # stored as fp16
    x0 = ldm_latents(teacher, Schedule(**cfg["schedule"]), shard["cond"], "dpmpp", 2, DEFAULT_GUIDANCE, seed=seed,
                     apg_norm=DEFAULT_APG_NORM).numpy()  # the teacher samples as the LDM does by default
    np.testing.assert_allclose(shard["x_0"].astype(np.float32), x0, atol=5e-3, rtol=2e-3)
    before = files[0].stat().st_mtime_ns
    distill.main(_pairs_args(tiny_data, tiny_weights, out, "--count", "12", "--shard", "4"))  # more data: one shard more
    assert len(list(out.glob("pairs-*.npz"))) == 3 and files[0].stat().st_mtime_ns == before
    for other in (["--guidance", "2"], ["--apg-norm", "0"]):  # other settings into the same folder: refused
        with pytest.raises(SystemExit):
            distill.main(_pairs_args(tiny_data, tiny_weights, out, "--count", "4", "--shard", "4", *other))


def test_best_of_pairs_record_the_kept_candidates_noise(tiny_data, tiny_weights, tmp_path):
    from python.models.classifier import load_classifier

    out = tmp_path / "pairs"
    distill.main(_pairs_args(tiny_data, tiny_weights, out, "--count", "5", "--shard", "5", "--best-of", "3"))
    shard = np.load(out / "pairs-00000.npz")
    teacher, cfg = load_denoiser(tiny_weights / "ldm")
    sch, cls = Schedule(**cfg["schedule"]), load_classifier(tiny_weights / "classifier")[0]
    cands = [ldm_latents(teacher, sch, shard["cond"], "dpmpp", 2, DEFAULT_GUIDANCE, seed=candidate_seed(0, k),
                         apg_norm=DEFAULT_APG_NORM).numpy()
             for k in range(3)]
    from python.core.best_of import label_set_loglik

    with torch.no_grad():
        scores = np.stack([label_set_loglik(cls(torch.from_numpy(c)).numpy(), shard["cond"]) for c in cands])
    pick = scores.argmax(0)
    for i, k in enumerate(pick):
        np.testing.assert_allclose(shard["x_T"][i], initial_noise(candidate_seed(0, k), 5, (4, 16, 16))[i], atol=2e-3)
        np.testing.assert_allclose(shard["x_0"][i].astype(np.float32), cands[k][i], atol=5e-3, rtol=2e-3)


def test_student_trains_resumes_ships_and_loads_as_the_gan(tiny_data, tiny_weights, tmp_path):
    from python.models.sampling import gan_latents
    from python.ship import main as ship

    pairs = tmp_path / "pairs"
    distill.main(_pairs_args(tiny_data, tiny_weights, pairs, "--count", "8", "--shard", "8"))
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--pairs", str(pairs), "--run-dir", str(run), "--ldm",
            str(tiny_weights / "ldm"), "--vae", str(tiny_weights / "vae"), "--judge", str(tiny_weights / "judge" / "judge.safetensors"),
            "--batch", "4", "--lr", "1e-3", "--eval-every", "2", "--eval-conditions", "6"]
    distill.main(args + ["--steps", "2", "--val-pairs", "2"])
    distill.main(args + ["--steps", "4", "--val-pairs", "2", "--resume"])
    assert "resumed at step 2" in (run / "log.txt").read_text()
    assert "6 teacher pairs" in (run / "log.txt").read_text() and "2 held out" in (run / "log.txt").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "heldout_subset" in m] == [2, 4]
    assert all(m["val_mse"] > 0 and np.isfinite(m["val_mse"]) for m in metrics if "heldout_subset" in m)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(np.isfinite(losses))
    adv_run = tmp_path / "adv"  # with the adversarial term: trains, checkpoints the discriminator, resumes it
    adv_args = [x if x != str(run) else str(adv_run) for x in args] + ["--adv-weight", "0.5", "--eval-every", "20",
                                                                        "--lr-schedule", "cosine"]
    distill.main(adv_args + ["--steps", "20"])
    distill.main(adv_args + ["--steps", "40", "--resume"])
    adv = [json.loads(line) for line in (adv_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in adv if "d_loss" in m] == [20, 40]
    assert all(np.isfinite(m["d_loss"]) and m["adv_w"] >= 0 and np.isfinite(m["reg"]) for m in adv if "d_loss" in m)
    # cosine decay to 0.05 x lr at --steps; the resumed segment restores the schedule's position (a fresh one would
    # be back at the top of its cosine: ~0.5 x lr at step 40)
    assert [round(m["lr"] / 1e-3, 3) for m in adv if "lr" in m] == [0.05, 0.05]
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "gan")])
    gen, cfg = load_generator(tmp_path / "gan")
    assert isinstance(gen, OneStep) and cfg["trained_steps"] == 4 and cfg["vae_sha"]
    lat = gan_latents(gen, np.eye(24, dtype=np.float32)[:3], seed=1)
    assert lat.shape == (3, 4, 16, 16) and torch.isfinite(lat).all()
    final, _ = load_generator(run / "final")
    for (k, a), b in zip(final.state_dict().items(), gen.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=k)  # the EMA weights, through fp16
    # --init: a new run (e.g. on more pairs) continues a shipped student; at lr 0 it stays that student
    warm = tmp_path / "warm"
    warm_args = [x if x != str(run) else str(warm) for x in args]
    distill.main(warm_args + ["--steps", "1", "--lr", "0", "--init", str(tmp_path / "gan")])
    assert f"warm start from {tmp_path / 'gan'}" in (warm / "log.txt").read_text()
    for (k, a), b in zip(load_generator(warm / "final")[0].state_dict().items(), gen.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    distill.main(adv_args[:adv_args.index(str(adv_run))] + [str(tmp_path / "warm_adv")] + adv_args[adv_args.index(str(adv_run)) + 1:]
           + ["--steps", "1", "--init", str(adv_run)])  # from a run folder: student, EMA and discriminator
    assert "warm start" in (tmp_path / "warm_adv" / "log.txt").read_text()


def test_classifier_agrees_means_every_requested_object_in_the_top_k():
    cond = torch.zeros(4, 24)
    cond[0, [1, 5]] = cond[1, [1, 5]] = cond[2, 7] = cond[3, [0, 2, 3]] = 1
    logits = torch.full((4, 24), -5.0)
    logits[0, [1, 5]] = 3.0                        # exactly the set
    logits[1, [1, 9]] = 3.0                        # one of two replaced by another object
    logits[2, [7, 8]] = torch.tensor([4.0, 2.0])   # the requested one first; an extra object below it is not counted
    logits[3, [0, 2]] = 3.0                        # two of three (the third ties with the rest and loses)
    x_0 = torch.zeros(4, 4, 16, 16)
    x_0.view(4, -1)[:, :24] = logits
    def first_24(x):  # a "classifier" whose logits are the latent's first 24 values
        return x.flatten(1)[:, :24]

    agree = distill.classifier_agrees(first_24, {"x_0": x_0, "cond": cond}, batch=3)
    assert agree.tolist() == [True, False, True, False]


def test_filter_trains_on_the_pairs_the_classifier_agrees_with(tiny_data, tiny_weights, tmp_path, capsys):
    from python.models.classifier import load_classifier, save_classifier

    pairs = tmp_path / "pairs"
    distill.main(_pairs_args(tiny_data, tiny_weights, pairs, "--count", "16", "--shard", "8"))
    _, tensors = distill.load_pairs(pairs)
    # a classifier that ignores the latent and ranks the objects of the first pair's set on top: it agrees with
    # the pairs that ask for that set (and with those asking for a prefix of its ranking), not with the others
    cls, ccfg = load_classifier(tiny_weights / "classifier")
    cls.head.weight.data.zero_()
    cls.head.bias.data = tensors["cond"][0] * 10 + torch.linspace(1, 0, 24)
    cls_dir = tmp_path / "classifier"
    save_classifier(cls, cls_dir, {k: v for k, v in ccfg.items() if k != "latent_channels"})
    kept = int(distill.classifier_agrees(load_classifier(cls_dir)[0], tensors).sum())
    first = (tensors["cond"] == tensors["cond"][0]).all(1)
    assert 0 < kept < 16 and kept >= int(first.sum()), kept
    base = ["train", "--data", str(tiny_data), "--pairs", str(pairs), "--ldm", str(tiny_weights / "ldm"), "--vae",
            str(tiny_weights / "vae"), "--judge", str(tiny_weights / "judge" / "judge.safetensors"), "--classifier",
            str(cls_dir), "--steps", "1", "--batch", "2", "--eval-every", "1",
            "--eval-conditions", "2", "--filter"]
    distill.main(base + ["--run-dir", str(tmp_path / "run")])
    assert f"kept {kept} of 16 pairs" in (tmp_path / "run" / "log.txt").read_text()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pairs_kept"] == kept
    with pytest.raises(SystemExit):  # the tiny weights' untrained classifier agrees with none of them
        distill.main(base[:base.index(str(cls_dir))] + [str(tiny_weights / "classifier")] + base[base.index(str(cls_dir)) + 1:]
               + ["--run-dir", str(tmp_path / "r-none")])
    assert "agrees with none of the 16 pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # holding out all the kept pairs leaves none to train on
        distill.main(base + ["--run-dir", str(tmp_path / "r-val"), "--val-pairs", str(kept)])
    assert f"leaves no training pairs (the folder holds 16, {kept} of them kept by --filter)" in capsys.readouterr().err


def test_class_term_pulls_the_student_towards_the_classifiers_labels(tiny_data, tiny_weights, tmp_path):
    """--cls-weight: the same run (same seed, same batches) with the class term ends with a lower binary
    cross-entropy of that classifier on the student's latents than without it, and logs the term."""
    import torch.nn.functional as F

    from python.models.classifier import load_classifier

    pairs = tmp_path / "pairs"
    distill.main(_pairs_args(tiny_data, tiny_weights, pairs, "--count", "8", "--shard", "8"))
    _, tensors = distill.load_pairs(pairs)
    base = ["train", "--data", str(tiny_data), "--pairs", str(pairs), "--ldm", str(tiny_weights / "ldm"), "--vae",
            str(tiny_weights / "vae"), "--judge", str(tiny_weights / "judge" / "judge.safetensors"), "--steps", "8",
            "--batch", "8", "--lr", "1e-3", "--ema", "0", "--eval-every", "8", "--eval-conditions", "2"]
    cls = load_classifier(tiny_weights / "classifier")[0]
    # a second, pixel classifier (untrained: its weights do not matter here) makes the term the mean of two
    from python.models.classifier import PixelClassifier, save_classifier
    from python.models.vae import vae_digest

    save_classifier(PixelClassifier.from_vae(tiny_weights / "vae").eval(), tmp_path / "pixels",
                    {"vae_sha": vae_digest(tiny_weights / "vae")})
    bce = {}
    for weight in ("0", "10"):
        run = tmp_path / f"run-{weight}"
        distill.main(base + ["--run-dir", str(run), "--cls-weight", weight, "--cls-classifier",
                       str(tiny_weights / "classifier"), str(tmp_path / "pixels")])
        student = load_generator(run / "final")[0]
        with torch.no_grad():
            fake = student(tensors["x_T"].flatten(1), tensors["cond"])
            bce[weight] = F.binary_cross_entropy_with_logits(cls(fake), tensors["cond"]).item()
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(("cls" in m) == (weight != "0") and np.isfinite(m.get("cls", 0)) for m in logged if "loss" in m)
    assert bce["10"] < bce["0"] - 1e-3, bce  # without the term the two runs are the same run (difference 0)
    assert "mean BCE of the classifier(s)" in (tmp_path / "run-10" / "log.txt").read_text()
    assert str(tmp_path / "pixels") in json.loads((tmp_path / "run-10" / "config.json").read_text())["cls_classifier"]


def test_pairs_and_train_errors(tiny_data, tiny_weights, tmp_path, capsys):
    with pytest.raises(SystemExit):
        distill.main(["train", "--pairs", str(tmp_path), "--data", str(tiny_data)])
    assert "no teacher pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main(["pairs", "--out", str(tmp_path / "p"), "--data", str(tiny_data), "--count", "0"])
    assert "--count must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main(["train", "--pairs", str(tmp_path), "--data", str(tiny_data), "--cls-weight", "-1"])
    assert "--cls-weight must be >= 0, got -1.0" in capsys.readouterr().err

    pairs = tmp_path / "pairs"
    distill.main(_pairs_args(tiny_data, tiny_weights, pairs, "--count", "4", "--shard", "4"))
    base = ["train", "--data", str(tiny_data), "--pairs", str(pairs), "--ldm", str(tiny_weights / "ldm"), "--vae",
            str(tiny_weights / "vae"), "--judge", str(tiny_weights / "judge" / "judge.safetensors"), "--steps", "1"]
    for init, message in [(tmp_path / "empty", "neither a run folder"), (tiny_weights / "gan", "not a distilled student")]:
        init.mkdir(exist_ok=True)
        with pytest.raises(SystemExit):
            distill.main(base + ["--run-dir", str(tmp_path / f"r-{init.name}"), "--init", str(init)])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main(base + ["--run-dir", str(tmp_path / "r-val"), "--val-pairs", "4"])
    assert "--val-pairs 4 leaves no training pairs (the folder holds 4)" in capsys.readouterr().err


def test_student_exports_and_the_runtime_matches_torch(tiny_weights, tmp_path):
    """A shipped student is the GAN path's generator: ONNX export and the torch-free runtime take it unchanged."""
    import shutil

    from export.to_onnx import export_all
    from python.models.denoiser import load_denoiser
    from python.models.generators import load_generator
    from python.models.one_step import OneStep
    from python.models.sampling import decode, gan_latents
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    w = tmp_path / "weights"
    shutil.copytree(tiny_weights, w)
    teacher, cfg = load_denoiser(w / "ldm")
    student = OneStep(teacher.cfg, cfg["schedule"])
    student.denoiser.load_state_dict(teacher.state_dict())
    shutil.rmtree(w / "gan")
    save_generator(student, w / "gan", {"vae_sha": cfg["vae_sha"]})
    export_all(w, tmp_path / "export", formats=("onnx",))
    pipe = Pipeline(ExportFolder(tmp_path / "export"))
    cond = np.zeros((3, 24), np.float32)
    cond[0, 1], cond[1, [4, 9]], cond[2, [0, 12, 23]] = 1, 1, 1
    ref = decode(Decoder(load_vae(w / "vae")), gan_latents(load_generator(w / "gan")[0], cond, seed=3))
    assert np.abs(pipe.generate(cond, "gan", seed=3) - ref.numpy()).max() <= 1e-3
