"""Classifier guidance on x_0 (python/core/diffusion.py guide_class) with the guidance classifier's gradient module
(python/models/classifier.py ClassifierGradient): the written-out backward pass against autograd, the maths, and
what a user sees when the guidance classifier is missing or the scale is bad."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.to_onnx import export_all
from python.core.diffusion import DEFAULT_CLASS_ITERS, DEFAULT_COUNT_WEIGHT, Schedule, guide_class, x0_eps
from python.core.errors import UserError
from python.core.labels import encode
from python.models.classifier import ClassifierGradient, CountClassifier, LatentClassifier, load_class_grad
from runtime.generate import Pipeline
from runtime.models import ExportFolder


def _trained_looking_classifier(channels=4):
    """A LatentClassifier whose batch norms hold non-trivial running statistics (what folding must get right)."""
    torch.manual_seed(3)
    cls = LatentClassifier(channels)
    cls.train()
    with torch.no_grad():
        for _ in range(3):
            cls(torch.randn(16, channels, 16, 16) * 2 + 0.5)
        for p in cls.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return cls.eval()


def test_gradient_module_is_autograd_of_the_summed_cross_entropy():
    cls = _trained_looking_classifier()
    grad = ClassifierGradient(cls, 16)
    x = torch.randn(6, 4, 16, 16)
    cond = torch.from_numpy(np.stack([encode(["red sphere"]), encode(["gray cube", "blue cylinder"])] * 3))
    xr = x.clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(cls(xr), cond, reduction="sum")
    ref, = torch.autograd.grad(loss, xr)
    got = grad(x, cond)
    assert got.shape == x.shape
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # each row's gradient is its own: another row's labels do not reach it
    assert (grad(x[:1], cond[:1]) - got[:1]).abs().max() <= 1e-5 * ref.abs().max()


def test_count_term_is_autograd_of_the_total_counts_cross_entropy():
    """The count term: count_weight x the counter's cross-entropy for as many objects as requested; a request above
    the counter's range (6 objects, totals 0..3 here) is its last bin."""
    cls = _trained_looking_classifier()
    torch.manual_seed(4)
    counter = CountClassifier(4, max_total=3)
    counter.train()
    with torch.no_grad():
        counter(torch.randn(16, 4, 16, 16))
        for p in counter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    counter.eval()
    grad = ClassifierGradient(cls, 16, counter.total, count_weight=2.5)
    x = torch.randn(4, 4, 16, 16)
    six = ["red sphere", "gray cube", "blue cylinder", "green cube", "cyan sphere", "purple cube"]
    cond = torch.from_numpy(np.stack([encode(["red sphere"]), encode(six[:2]), encode(six), encode(six[:3])]))
    xr = x.clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(cls(xr), cond, reduction="sum") + 2.5 * F.cross_entropy(
        counter(xr)[1], torch.tensor([1, 2, 3, 3]), reduction="sum")
    ref, = torch.autograd.grad(loss, xr)
    got = grad(x, cond)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    labels_only = ClassifierGradient(cls, 16)(x, cond)
    assert (got - labels_only).abs().max() > 0.05 * ref.abs().max()  # the count term is there, not a rounding
    assert ClassifierGradient(cls, 16, counter.total, count_weight=0.0).total is None  # weight 0: no counter read


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guide_class_moves_x0_by_the_scaled_gradient(prediction):
    rng = np.random.default_rng(0)
    x_t, out, step = (rng.standard_normal((2, 4, 8, 8)).astype(np.float64) for _ in range(3))
    sch = Schedule("cosine", prediction=prediction)
    a, s = (float(v) for v in sch.coeffs(400))
    guided = guide_class(out, x_t, a, s, prediction, lambda x0: step, 1.5)
    np.testing.assert_allclose(x0_eps(x_t, guided, a, s, prediction)[0],
                               x0_eps(x_t, out, a, s, prediction)[0] - 1.5 * step, atol=1e-10)
    # several descent steps: each gradient taken where the last step left x_0 (here grad = 0.2 x_0, so each step
    # scales x_0 by 1 - 1.5 * 0.2)
    x0 = x0_eps(x_t, out, a, s, prediction)[0]
    seen = []
    three = guide_class(out, x_t, a, s, prediction, lambda z: seen.append(z) or 0.2 * z, 1.5, iters=3)
    np.testing.assert_allclose(x0_eps(x_t, three, a, s, prediction)[0], 0.7 ** 3 * x0, atol=1e-10)
    assert len(seen) == 3 and np.allclose(seen[2], 0.7 ** 2 * x0)
    for bad in (0, 17, 2.0, True):
        with pytest.raises(UserError, match="whole number of descent steps"):
            guide_class(out, x_t, a, s, prediction, lambda z: z, 1.5, iters=bad)


@pytest.mark.parametrize("count_weight", [0.0, DEFAULT_COUNT_WEIGHT])
def test_classifier_guidance_lowers_the_guidance_loss(tiny_weights, count_weight):
    """The point of the term: samples that the guidance classifier reads as the requested labels more often (and,
    with the count term, that the counter reads as holding as many objects as requested)."""
    from python.models.classifier import load_classifier
    from python.models.denoiser import load_denoiser
    from python.models.sampling import ldm_latents

    model, cfg = load_denoiser(tiny_weights / "ldm")
    sch = Schedule(**cfg["schedule"])
    grad = load_class_grad(tiny_weights / "guide", tiny_weights / "vae", count_weight)
    assert (grad.total is None) == (count_weight == 0)
    cls = load_classifier(tiny_weights / "guide")[0]
    counter = load_classifier(tiny_weights / "guide" / "counter")[0]
    cond = np.stack([encode(["red sphere"]), encode(["gray cube", "cyan cylinder"])] * 4)
    c = torch.from_numpy(cond)
    loss = {}
    for scale, iters in ((0.0, 1), (3.0, 1), (3.0, 3)):
        z = ldm_latents(model, sch, cond, "dpmpp", 6, 2.0, seed=1, apg_norm=0.0, class_grad=grad, class_scale=scale,
                        class_iters=iters)
        with torch.no_grad():
            loss[scale, iters] = float(F.binary_cross_entropy_with_logits(cls(z), c, reduction="sum")
                                       + count_weight * F.cross_entropy(counter(z), c.sum(1).long(), reduction="sum"))
    assert loss[3.0, 1] < loss[0.0, 1] and loss[3.0, 3] < loss[0.0, 1], loss


def test_export_without_a_guidance_classifier(tiny_weights, tmp_path, capsys):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights, ignore=shutil.ignore_patterns("guide"))
    export_all(weights, tmp_path / "e", formats=("onnx",))
    assert "class_grad: no guidance classifier" in capsys.readouterr().out
    pipe = Pipeline(ExportFolder(tmp_path / "e"))
    assert pipe.default_class_scale == 0.0  # what the server gives a request that names no scale
    cond = encode(["red sphere"])[None]
    with pytest.raises(UserError, match="class_grad.*--class-scale 0"):
        pipe.ldm_latents(cond, steps=2)
    assert pipe.ldm_latents(cond, steps=2, class_scale=0.0).shape == (1, 4, 16, 16)
    with pytest.raises(UserError, match="no guidance classifier"):
        load_class_grad(weights / "guide", weights / "vae")


def test_exported_gradient_holds_the_count_term_where_guide_has_a_counter(onnx_export, tiny_weights, tmp_path,
                                                                           capsys):
    """class_grad.onnx is the torch module's gradient, with the count term from guide/counter; without that folder
    the export says so and holds the label term alone."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    shutil.rmtree(weights / "guide" / "counter")
    export_all(weights, tmp_path / "e", formats=("onnx",))
    assert "no total counter" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)
    cond = np.stack([encode(["red sphere"]), encode(["gray cube", "cyan cylinder"]), encode(["blue cube"])])
    ref = {w: load_class_grad(tiny_weights / "guide", tiny_weights / "vae", w)(torch.from_numpy(z),
                                                                              torch.from_numpy(cond)).numpy()
           for w in (0.0, DEFAULT_COUNT_WEIGHT)}
    for folder, w in ((onnx_export, DEFAULT_COUNT_WEIGHT), (tmp_path / "e", 0.0)):
        got = ExportFolder(folder).run("class_grad", {"latents": z, "cond": cond})[0]
        assert np.abs(got - ref[w]).max() <= 1e-4 * np.abs(ref[w]).max(), folder
    assert np.abs(ref[DEFAULT_COUNT_WEIGHT] - ref[0.0]).max() > 1e-3 * np.abs(ref[0.0]).max()


def test_every_cli_with_class_scale_refuses_a_bad_one_in_one_line(onnx_export, tiny_weights, tmp_path, capsys):
    from bench import extra_objects, side_by_side
    from python import eval_gen
    from runtime import generate

    runs = [(generate.main, ["--labels", "red sphere", "--export", str(onnx_export), "--out", str(tmp_path / "g.png")]),
            (eval_gen.main, ["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tmp_path)]),
            (extra_objects.main, ["--data", str(tmp_path), "--weights", str(tiny_weights)]),
            (side_by_side.main, ["--data", str(tmp_path), "--ldm", str(tiny_weights / "ldm"), "--out", str(tmp_path / "s.png")])]
    for main, args in runs:
        for bad in ("-1", "nan", "inf"):
            with pytest.raises(SystemExit) as e:
                main(args + ["--class-scale", bad])
            assert e.value.code == 2
            err = capsys.readouterr().err.strip()
            assert "--class-scale must be" in err and len(err.splitlines()) == 1, err
    for main, args in runs:
        with pytest.raises(SystemExit) as e:
            main(args + ["--class-iters", "0"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "--class-iters must be a whole number" in err and len(err.splitlines()) == 1, err


def test_server_default_follows_the_export(onnx_export, tiny_weights, tmp_path):
    from runtime.serve import BadRequest, Limits, batch_key, parse_request

    body = {"labels": ["red sphere"]}
    assert Pipeline(ExportFolder(onnx_export)).default_class_scale == 2.0
    with_grad, without = Limits(), Limits(class_guidance=False)
    assert parse_request(body, with_grad)["class_scale"] == 2.0
    assert parse_request(body, without)["class_scale"] == 0.0
    with pytest.raises(BadRequest, match="no class_grad"):
        parse_request({**body, "class_scale": 1.0}, without)
    with pytest.raises(BadRequest, match="'class_scale' must be"):
        parse_request({**body, "class_scale": -1.0}, with_grad)
    assert batch_key(parse_request(body, with_grad)) != batch_key(parse_request({**body, "class_scale": 0}, with_grad))
    assert parse_request(body, with_grad)["class_iters"] == DEFAULT_CLASS_ITERS
    other = 3 if DEFAULT_CLASS_ITERS != 3 else 1  # a non-default descent count is its own batch
    assert batch_key(parse_request(body, with_grad)) != batch_key(parse_request({**body, "class_iters": other},
                                                                                with_grad))
    for bad, words in ((0, "whole number"), (5, "between 1 and 4"), (2.0, "must be int"), (True, "must be int")):
        with pytest.raises(BadRequest, match=f"'class_iters'.*{words}|'class_iters' {words}"):
            parse_request({**body, "class_iters": bad}, with_grad)
    json.dumps(parse_request(body, with_grad))  # a request stays plain JSON data


def test_eval_gen_reports_each_class_scale_as_a_setting(tiny_weights, tiny_data, tmp_path):
    from PIL import Image

    from python import eval_gen

    out, js = tmp_path / "out", tmp_path / "eval.json"
    eval_gen.main(["--model", "ldm", "--weights", str(tiny_weights), "--data", str(tiny_data), "--files", "test.json",
                   "--seeds", "0", "--steps", "2", "--guidance", "2", "--class-scale", "0", "4", "--limit", "4",
                   "--diversity-conditions", "2", "--per-condition", "2", "--no-fidelity", "--out", str(out),
                   "--json", str(js)])
    rep = json.loads(js.read_text())
    assert [r["class_scale"] for r in rep["results"]] == [0.0, 4.0]
    assert "count_weight" not in rep["results"][0] and rep["results"][1]["count_weight"] == DEFAULT_COUNT_WEIGHT
    assert "class_iters" not in rep["results"][0] and rep["results"][1]["class_iters"] == DEFAULT_CLASS_ITERS
    plain = np.asarray(Image.open(out / "ldm_test_s2_g2_apg5.png"), np.int16)
    suffix = f"_it{DEFAULT_CLASS_ITERS}" if DEFAULT_CLASS_ITERS != 1 else ""  # one step is the plain name
    guided = np.asarray(Image.open(out / f"ldm_test_s2_g2_apg5_cg4{suffix}.png"), np.int16)
    assert plain.shape == guided.shape and np.abs(plain - guided).max() > 0


def test_only_a_latent_classifier_can_guide(tiny_weights, tmp_path):
    from python.models.classifier import PixelClassifier, save_classifier
    from python.models.vae import vae_digest

    save_classifier(PixelClassifier.from_vae(tiny_weights / "vae").eval(), tmp_path / "pixels",
                    {"vae_sha": vae_digest(tiny_weights / "vae")})
    with pytest.raises(UserError, match="needs a latent classifier"):
        load_class_grad(tmp_path / "pixels", tiny_weights / "vae")
    with pytest.raises(UserError, match="no guidance classifier"):  # the image counter's folder holds none
        load_class_grad(tiny_weights / "counter", tiny_weights / "vae")


def test_bench_tools_sample_with_the_descent_steps_they_are_given(tiny_weights, tiny_data, tmp_path, monkeypatch):
    """extra_objects and side_by_side hand --class-iters to the sampler (and extra_objects records it)."""
    from bench import extra_objects, side_by_side
    from python.models import sampling

    seen, real = [], sampling.ldm_latents
    monkeypatch.setattr(sampling, "ldm_latents", lambda *a, **k: seen.append(k["class_iters"]) or real(*a, **k))
    js = tmp_path / "extra.json"
    extra_objects.main(["--data", str(tiny_data), "--weights", str(tiny_weights), "--limit", "2", "--steps", "2",
                        "--class-iters", "2", "--json", str(js)])
    side_by_side.main(["--data", str(tiny_data), "--file", "heldout.json", "--limit", "2", "--steps", "2",
                       "--ldm", str(tiny_weights / "ldm"), "--vae", str(tiny_weights / "vae"), "--class-iters", "4",
                       "--out", str(tmp_path / "s.png")])
    assert seen == [2, 4]
    assert json.loads(js.read_text())["class_iters"] == 2
