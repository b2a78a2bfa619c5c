import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.to_onnx import export_all
from python.core.diffusion import Schedule
from python.core.errors import UserError
from python.core.labels import encode
from python.models.classifier import load_class_grad
from python.models.denoiser import load_denoiser
from python.models.generators import load_generator
from python.models.sampling import decode, gan_latents, ldm_latents
from python.models.vae import VAE, Decoder, VAEConfig, load_vae, save_vae
from runtime.generate import Pipeline
from runtime.models import ExportFolder


@pytest.fixture(scope="module")
def export(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    m = export_all(tiny_weights, out, formats=("onnx", "torchscript"))
    return out, m


def test_manifest_lists_everything(export):
    out, m = export
    assert {"judge", "judge2", "decoder", "denoiser", "generator", "classifier", "class_grad"} <= set(m["models"])
    assert {"decoder_ts", "denoiser_ts", "generator_ts", "class_grad_ts"} <= set(m["models"])
    for name, entry in m["models"].items():
        assert entry["verified_max_rel_err"] <= 1e-4 and len(entry["sha256"]) == 64, name
        assert (out / entry["file"]).stat().st_size == entry["bytes"]
    assert m["models"]["denoiser"]["schedule"]["prediction"] == "v_prediction"
    assert m["models"]["decoder"]["latent_shape"] == [4, 16, 16] and m["models"]["generator"]["z_dim"] == 128


def _conditions():
    return np.stack([encode(s) for s in (["red sphere", "yellow cube", "cyan cylinder"], ["gray cube"],
                                         ["blue sphere", "green cylinder"])])


@pytest.mark.parametrize("sampler, steps, guidance, apg_norm, class_scale", [
    ("dpmpp", 8, 2.0, 0.0, 0.0), ("ddim", 6, 1.0, 0.0, 0.0), ("ddpm", 5, 3.0, 0.0, 0.0), ("dpmpp", 8, 3.0, 2.0, 0.0),
    ("dpmpp", 8, 3.0, 2.0, 2.0), ("ddim", 6, 1.0, 0.0, 3.0)])
def test_ldm_parity_with_torch(export, tiny_weights, sampler, steps, guidance, apg_norm, class_scale):
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    out, _ = export
    pipe = Pipeline(ExportFolder(out))
    cond = _conditions()
    ours = pipe.decode(pipe.ldm_latents(cond, sampler, steps, guidance, seed=5, batch=2,  # chunked: 2 + 1
                                        apg_norm=apg_norm, class_scale=class_scale))
    model, cfg = load_denoiser(tiny_weights / "ldm")
    schedule = Schedule(**cfg["schedule"])
    grad = load_class_grad(tiny_weights / "guide", tiny_weights / "vae")
    ref = decode(Decoder(load_vae(tiny_weights / "vae")),
                 ldm_latents(model, schedule, cond, sampler, steps, guidance, seed=5, apg_norm=apg_norm,
                             class_grad=grad, class_scale=class_scale))
    assert ours.shape == (3, 3, 64, 64)
    assert np.abs(ours - ref.numpy()).max() <= 1e-3
    if apg_norm:  # the projected guidance is not classifier-free guidance under another name
        cfg_lat = ldm_latents(model, schedule, cond, sampler, steps, guidance, seed=5, apg_norm=0.0)
        apg_lat = ldm_latents(model, schedule, cond, sampler, steps, guidance, seed=5, apg_norm=apg_norm)
        assert (cfg_lat - apg_lat).abs().max() > 1e-3
    if class_scale:  # and the classifier guidance changes the samples
        plain = ldm_latents(model, schedule, cond, sampler, steps, guidance, seed=5, apg_norm=apg_norm)
        guided = ldm_latents(model, schedule, cond, sampler, steps, guidance, seed=5, apg_norm=apg_norm,
                             class_grad=grad, class_scale=class_scale)
        assert (plain - guided).abs().max() > 1e-3


def test_gan_parity_with_torch(export, tiny_weights):
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    out, _ = export
    pipe = Pipeline(ExportFolder(out))
    cond = _conditions()
    gen, _ = load_generator(tiny_weights / "gan")
    ref = decode(Decoder(load_vae(tiny_weights / "vae")), gan_latents(gen, cond, seed=3))
    assert np.abs(pipe.generate(cond, "gan", seed=3) - ref.numpy()).max() <= 1e-3


def test_torchscript_matches(export, tiny_weights):
    out, _ = export
    dec = torch.jit.load(str(out / "decoder.ts"))
    z = torch.randn(3, 4, 16, 16)
    assert torch.allclose(dec(z), Decoder(load_vae(tiny_weights / "vae"))(z), atol=1e-5)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], capture_output=True, text=True)


def test_cli_labels_and_conditions(export, tmp_path, tiny_data):
    out, _ = export
    r = _cli("--labels", "red sphere,yellow cube", "-n", "3", "--steps", "3", "--export", str(out),
             "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (3 * 66 + 2, 68)  # 3 images: one row of 3
    r = _cli("--conditions", str(tiny_data / "test.json"), "--model", "gan", "--export", str(out),
             "--out", str(tmp_path / "test"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["images"] == 32 and 0 <= res["accuracy"] <= 1 and "second_judge" in res
    assert (tmp_path / "test" / "31.png").exists() and (tmp_path / "test" / "grid.png").exists()


@pytest.mark.parametrize("args, msg", [
    (["--labels", "grey cube"], "unknown label 'grey cube'; valid names are"),
    (["--labels", "red cube,red cube"], "repeated"),
    (["--labels", "red cube", "--sampler", "euler"], "--sampler must be one of ddpm, ddim, dpmpp, got 'euler'"),
    (["--labels", "red cube", "--steps", "0"], "--steps must be between 1 and 1000, got 0"),
    (["--labels", "red cube", "--steps", "1001"], "--steps must be between 1 and 1000, got 1001"),
    (["--labels", "red cube", "--model", "vae"], "--model must be 'ldm' or 'gan'"),
    (["--labels", "red sphere", "-n", "100000000", "--model", "gan"], "-n must be between 1 and 65536"),
    (["--labels", "red sphere", "-n", "0"], "-n must be between 1 and 65536, got 0"),
    (["--labels", "red sphere", "--guidance", "nan"], "--guidance must be between 0.0 and 20.0, got nan"),
    (["--labels", "red sphere", "--guidance", "inf"], "--guidance must be between 0.0 and 20.0, got inf"),
    (["--labels", "red sphere", "--eta", "-0.5"], "--eta must be between 0.0 and 1.0, got -0.5"),
    (["--labels", "red sphere", "--apg-norm", "-1"], "--apg-norm must be 0 (classifier-free guidance), a positive"),
    (["--labels", "red sphere", "--apg-norm", "nan"], "--apg-norm must be 0 (classifier-free guidance), a positive"),
    (["--labels", "red sphere", "--best-of", "17"], "--best-of must be between 1 and 16, got 17"),
    (["--labels", "red sphere", "-n", "8192", "--best-of", "16"], "131072 candidate images, at most 65536"),
    (["--labels", "red sphere", "--out", "{tmp}/grid"], "give a file name ending in .png"),
    (["--labels", "red sphere", "--out", "{tmp}"], "give a file name ending in .png"),
    (["--labels", "red sphere", "--out", "{tmp}/afile/x.png"], "afile is a file, not a folder"),
    (["--conditions", "{data}/test.json", "--out", "{tmp}/afile"], "a file exists there"),
])
def test_cli_errors(export, tmp_path, tiny_data, args, msg):
    """Bad settings end in one line and exit status 2 before anything is generated or written."""
    out, _ = export
    (tmp_path / "afile").write_text("")
    args = [a.format(tmp=tmp_path, data=tiny_data) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.png")]
    before = sorted(tmp_path.rglob("*"))
    r = _cli(*args, "--export", str(out))
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_missing_generator_and_mismatched_vae(tiny_weights, tmp_path):
    import shutil

    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    w = tmp_path / "w"
    shutil.copytree(tiny_weights, w, ignore=shutil.ignore_patterns("gan", "ldm"))
    export_all(w, tmp_path / "e")
    with pytest.raises(UserError, match="no denoiser"):
        Pipeline(ExportFolder(tmp_path / "e")).ldm_latents(_conditions())
    shutil.copytree(tiny_weights / "ldm", w / "ldm")
    save_vae(VAE(VAEConfig(channels=[16, 8])), w / "vae")  # a different VAE than the LDM was trained on
    with pytest.raises(UserError, match="trained on VAE"):
        export_all(w, tmp_path / "e2")


def test_fp16_export_and_runtime(tiny_weights, tmp_path):
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    m = export_all(tiny_weights, tmp_path, formats=("onnx",), fp16=True)
    for name in ("judge", "decoder", "denoiser", "generator"):
        e = m["models"][f"{name}_fp16"]
        assert e["format"] == "onnx-fp16" and e["verified_max_rel_err"] <= e["tolerance"]
        assert e["bytes"] < m["models"][name]["bytes"]
    assert m["models"]["judge_fp16"]["bytes"] < 0.55 * m["models"]["judge"]["bytes"]  # weights dominate: half
    cond = _conditions()
    full = Pipeline(ExportFolder(tmp_path)).generate(cond, "ldm", steps=4, seed=3)
    half = Pipeline(ExportFolder(tmp_path, precision="fp16")).generate(cond, "ldm", steps=4, seed=3)
    assert 0 < np.abs(full - half).max() < 5e-2  # a different model, and close to the float32 one
    with pytest.raises(UserError, match="precision"):
        ExportFolder(tmp_path, precision="int4")
    with pytest.raises(UserError, match="no int8 copies; export them with .* --int8 --data DIR"):
        ExportFolder(tmp_path, precision="int8")  # fp16 copies only: int8 would have run fp32 throughout


def test_a_mixed_or_damaged_export_is_refused_at_load(export, tmp_path):
    """A file that is not the one the manifest lists (a half-finished re-export, a damaged copy) and a manifest that
    is not one end in one line naming the file, not in images from the wrong model."""
    import shutil

    out, _ = export
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copyfile(mixed / "classifier.onnx", mixed / "decoder.onnx")  # a new file beside the old manifest
    pipe = Pipeline(ExportFolder(mixed))
    with pytest.raises(UserError, match="decoder.onnx: its checksum differs from manifest.json's"):
        pipe.generate(encode(["red cube"])[None], "gan")
    (mixed / "generator.onnx").unlink()
    with pytest.raises(UserError, match="generator.onnx: listed in manifest.json but missing"):
        Pipeline(ExportFolder(mixed)).gan_latents(encode(["red cube"])[None])
    (mixed / "manifest.json").write_text('{"models": ')
    with pytest.raises(UserError, match="manifest.json: not an export manifest"):
        ExportFolder(mixed)
