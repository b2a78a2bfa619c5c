import json

import numpy as np
import pytest
import torch

from python.core.best_of import SEED_STRIDE, best_of, best_of_latents, candidate_seed, label_set_loglik
from python.core.diffusion import DEFAULT_CLASS_ITERS
from python.core.errors import UserError


def test_label_set_loglik_by_hand():
    labels = np.array([[1, 0], [1, 0], [0, 0]], np.float32)
    logits = np.array([[0.0, 0.0], [3.0, -3.0], [-3.0, 3.0]])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = [2 * np.log(0.5), 2 * np.log(sig(3.0)), np.log(sig(3.0)) + np.log(sig(-3.0))]
    np.testing.assert_allclose(label_set_loglik(logits, labels), expected, rtol=1e-12)
    # saturated logits stay finite: a confident wrong answer is a large finite penalty, not -inf
    far = label_set_loglik(np.array([[-800.0, 800.0]]), np.array([[1, 0]]))
    assert np.isfinite(far).all() and far[0] == pytest.approx(-1600.0)


def test_best_of_latents_draws_every_candidate_in_one_call_with_candidate_seeds():
    """Candidate k of the part (seed s, m rows) is those m rows drawn with candidate_seed(s, k), all in one sample
    call; n = 1 is that call with the seeds as given; the pick is per row."""
    cond = np.zeros((3, 24), np.float32)
    cond[:, 0] = 1
    calls = []

    def sample(c, seeds):  # each row's latent holds the seed it was drawn with
        calls.append((len(c), seeds))
        return np.concatenate([np.full((m, 1, 2, 2), float(s), np.float32) for s, m in seeds])

    parts = [(5, 2), (9, 1)]
    plain = best_of_latents(sample, cond, 1, seeds=parts)
    assert calls == [(3, parts)] and plain[:, 0, 0, 0].tolist() == [5, 5, 9]
    calls.clear()
    favourite = {0: 1, 1: 0, 2: 2}  # the candidate the classifier likes for each row

    def logits(lat):
        k = np.round((lat[:, 0, 0, 0] - np.array([5, 5, 9])) / SEED_STRIDE).astype(int)
        return np.where(np.array([favourite[i] for i in range(3)]) == k, 9.0, -9.0)[:, None] * np.eye(24)[0]

    got = best_of_latents(sample, cond, 3, logits, seeds=parts)
    assert calls == [(9, [(candidate_seed(s, k), m) for k in range(3) for s, m in parts])]
    assert got[:, 0, 0, 0].tolist() == [candidate_seed(5, 1), candidate_seed(5, 0), candidate_seed(9, 2)]
    with pytest.raises(UserError, match="needs the latent classifier"):
        best_of_latents(sample, cond, 2)


def test_best_of_keeps_each_rows_most_likely_candidate():
    cond = np.zeros((4, 24), np.float32)
    cond[:, 0] = 1

    def sample(k):  # candidate k: every latent filled with k
        return np.full((4, 2, 3, 3), float(k), np.float32)

    def logits(lat):  # row i's classifier sees class 0 only in candidate (i % 3)
        k = lat[:, 0, 0, 0]
        out = np.full((len(lat), 24), -5.0)
        out[:, 0] = np.where(k == np.arange(len(lat)) % 3, 5.0, -5.0)
        return out

    lat, pick = best_of(3, sample, logits, cond)
    assert pick.tolist() == [0, 1, 2, 0]
    assert lat.shape == (4, 2, 3, 3) and lat[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0]


def test_best_of_one_is_plain_sampling_and_bad_n_is_refused():
    calls = []
    lat, pick = best_of(1, lambda k: calls.append(k) or np.ones((2, 1)), lambda z: 1 / 0, np.zeros((2, 24)))
    assert calls == [0] and pick.tolist() == [0, 0] and lat.shape == (2, 1)  # no classifier call at all
    with pytest.raises(UserError, match="best-of must be >= 1"):
        best_of(0, lambda k: np.ones((2, 1)), lambda z: z, np.zeros((2, 24)))
    assert candidate_seed(7, 0) == 7 and candidate_seed(7, 2) == 7 + 2 * SEED_STRIDE


def test_runtime_best_of_matches_a_manual_selection(onnx_export):
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    pipe = Pipeline(ExportFolder(onnx_export, threads=2))
    cond = np.zeros((3, 24), np.float32)
    cond[0, [1, 9]] = cond[1, 4] = cond[2, [2, 12, 20]] = 1
    kw = dict(sampler="dpmpp", steps=3, guidance=2.0)
    got = pipe.generate(cond, "ldm", 3, seed=5, **kw)
    cands = [pipe.ldm_latents(cond, seed=candidate_seed(5, k), **kw) for k in range(3)]
    scores = np.stack([label_set_loglik(pipe.classifier_logits(c), cond) for c in cands])
    want = pipe.decode(np.stack(cands)[scores.argmax(0), np.arange(3)])
    np.testing.assert_allclose(got, want, atol=1e-4)  # one batch of 9 rows there, three of 3 here
    np.testing.assert_allclose(pipe.generate(cond, "ldm", 1, seed=5, **kw), pipe.decode(cands[0]), atol=1e-4)
    # per-request seeds (the server's merged batches) get their own candidates: rows 0-1 seed 5, row 2 seed 9
    merged = pipe.generate(cond, "ldm", 2, seeds=[(5, 2), (9, 1)], **kw)
    np.testing.assert_allclose(merged[:2], pipe.generate(cond[:2], "ldm", 2, seed=5, **kw), atol=1e-4)
    np.testing.assert_allclose(merged[2:], pipe.generate(cond[2:], "ldm", 2, seed=9, **kw), atol=1e-4)


def test_runtime_generate_cli_best_of(onnx_export, tmp_path, capsys):
    from runtime.generate import main

    cond_file = tmp_path / "c.json"
    cond_file.write_text(json.dumps([["red sphere"], ["gray cube", "blue cylinder"]]))
    main(["--conditions", str(cond_file), "--export", str(onnx_export), "--steps", "2", "--best-of", "2",
          "--out", str(tmp_path / "out")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 2 and 0 <= res["accuracy"] <= 1 and (tmp_path / "out" / "1.png").exists()
    with pytest.raises(SystemExit):
        main(["--labels", "red sphere", "--export", str(onnx_export), "--best-of", "0", "--out", str(tmp_path / "g.png")])


def test_train_classifier_cli_trains_saves_reloads_and_resumes(tiny_data, parts, tmp_path):
    from python.models.classifier import load_classifier
    from python.train_classifier import main

    run, out = tmp_path / "run", tmp_path / "weights"
    args = ["--data", str(tiny_data), "--vae", str(parts / "vae"), "--run-dir", str(run), "--steps", "3",
            "--batch", "4", "--out", str(out)]
    main(args)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 3 and 0 <= cfg["heldout_accuracy"] <= 1 and len(cfg["vae_sha"]) == 12
    cls, _ = load_classifier(out)
    ref, _ = load_classifier(run / "final")
    z = torch.randn(2, cfg["latent_channels"], 16, 16)
    assert torch.equal(cls(z), ref(z)) and cls(z).shape == (2, 24)
    main(args)  # again: the trained classifier in the run folder is reused, not retrained
    assert "latent classifier loaded" in (run / "log.txt").read_text()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert sum("classifier" in m for m in metrics) == 1
    with pytest.raises(UserError, match="no latent classifier here"):
        load_classifier(tmp_path / "nothing")


def test_eval_gen_best_of_needs_and_uses_the_classifier(tiny_weights, tiny_data, tmp_path):
    from python.eval_gen import main

    args = ["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
            "--seeds", "0", "--steps", "2", "--limit", "4", "--diversity-conditions", "2", "--per-condition", "2"]
    rep = main([*args, "--best-of", "2", "--out", str(tmp_path / "grids")])
    assert rep["best_of"] == 2 and 0 <= rep["results"][0]["files"]["test.json"]["accuracy_mean"] <= 1
    it = f"_it{DEFAULT_CLASS_ITERS}" if DEFAULT_CLASS_ITERS != 1 else ""  # one descent step is the plain name
    assert sorted(f.name for f in (tmp_path / "grids").glob("*.png")) == [f"ldm_best_of_2_test_s2_g5_apg5_cg2{it}.png",
                                                                          "ldm_denoising_process.png"]
    weights = tmp_path / "weights"
    weights.mkdir()
    for d in tiny_weights.iterdir():
        if d.name != "classifier":
            (weights / d.name).symlink_to(d)
    with pytest.raises(SystemExit):
        main([*args[:2], "--weights", str(weights), *args[4:], "--best-of", "2"])


def test_pixel_classifier_reads_the_vaes_decoded_image_and_reloads(tiny_data, parts, tmp_path):
    from python.models.classifier import PixelClassifier, load_classifier
    from python.models.vae import Decoder, load_vae
    from python.train_classifier import main

    run, out = tmp_path / "run", tmp_path / "weights"
    main(["--data", str(tiny_data), "--vae", str(parts / "vae"), "--run-dir", str(run), "--steps", "2",
          "--batch", "4", "--pixels", "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["input"] == "pixels" and cfg["vae"]["channels"] == [16, 8]
    cls, _ = load_classifier(out)
    assert isinstance(cls, PixelClassifier)
    z = torch.randn(3, cfg["latent_channels"], 16, 16, requires_grad=True)
    # its first stage is the VAE's decoder (stored in fp16 with it), frozen
    ref = Decoder(load_vae(parts / "vae"))
    assert torch.allclose(cls.decoder(z), ref(z), atol=2e-2)
    assert not any(p.requires_grad for p in cls.parameters())
    logits = cls(z)
    assert logits.shape == (3, 24)
    logits.sum().backward()  # what distill's class term needs: a gradient on the latent through the decoder
    assert z.grad is not None and z.grad.abs().sum() > 0
    again, _ = load_classifier(run / "final")
    assert torch.equal(again(z.detach()), cls(z.detach()))
