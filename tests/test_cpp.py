"""The C++ DDIM sampler (runtime/cpp, built by CMake against the torch wheel) against the Python runtime."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from export.to_onnx import export_all
from python.core.diffusion import DEFAULT_CLASS_ITERS
from python.core.labels import encode

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / "build" / "ldm_sample"


@pytest.fixture(scope="module")
def binary():
    """`make test` builds it first; build it here too so the test also runs on its own."""
    if not BINARY.exists():
        import torch

        tdir = os.path.dirname(torch.__file__)
        subprocess.run(["cmake", "-S", str(REPO), "-B", str(REPO / "build"), f"-DTORCH_DIR={tdir}"], check=True,
                       capture_output=True)
        subprocess.run(["cmake", "--build", str(REPO / "build"), "-j2"], check=True, capture_output=True)
    return BINARY


def _parity_inputs(tiny_weights, tmp_path, noise_seed: int):
    """An ONNX + TorchScript export of the tiny weights, the Python runtime over it, two conditions and their x_T,
    and ldm_sample's arguments that read the same conditions and x_T from files."""
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    ex = tmp_path / "export"
    export_all(tiny_weights, ex, formats=("onnx", "torchscript"))
    cond = np.stack([encode(["red sphere", "yellow cube"]), encode(["gray cube"])])
    x_T = np.random.default_rng(noise_seed).standard_normal((2, 4, 16, 16), dtype=np.float32)
    cond.astype(np.float32).tofile(tmp_path / "cond.f32")
    x_T.tofile(tmp_path / "noise.f32")
    return ex, Pipeline(ExportFolder(ex)), cond, x_T, ["--cond", str(tmp_path / "cond.f32"), "--noise",
                                                      str(tmp_path / "noise.f32")]


def test_cpp_matches_python_runtime(binary, tiny_weights, tmp_path):
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    ex = tmp_path / "export"
    export_all(tiny_weights, ex, formats=("onnx", "torchscript"))
    cond = np.stack([encode(["red sphere", "yellow cube", "cyan cylinder"]), encode(["gray cube"])])
    noise = np.random.default_rng(9).standard_normal((2, 4, 16, 16), dtype=np.float32)
    cond.astype(np.float32).tofile(tmp_path / "cond.f32")
    noise.tofile(tmp_path / "noise.f32")
    out = tmp_path / "cpp"
    out.mkdir()
    pipe = Pipeline(ExportFolder(ex))
    # classifier-free, projected with a cap, projected without one; each alone and with classifier guidance (the
    # default descent steps, and one)
    settings = [(0.0, 0.0, 1), (0.3, 0.0, 1), (float("inf"), 0.0, 1), (0.0, 2.0, 3), (0.3, 2.0, 3), (0.3, 2.0, 1)]
    refs = {(r, c, k): pipe.decode(pipe.ldm_latents(cond, "ddim", 6, 2.5, x_T=noise, apg_norm=r, class_scale=c,
                                                    class_iters=k))
            for r, c, k in settings}
    # the untrained decoder squashes the guidances' difference, so parity must be well inside that difference
    gap = min(np.abs(refs[a] - refs[b]).max() for i, a in enumerate(settings) for b in settings[i + 1:])
    assert gap > 0
    for (apg_norm, class_scale, class_iters), ref in refs.items():
        iters = ["--class-iters", str(class_iters)] if class_iters != DEFAULT_CLASS_ITERS else []  # else its default
        r = subprocess.run([str(binary), str(ex), str(out), "--cond", str(tmp_path / "cond.f32"), "--noise",
                            str(tmp_path / "noise.f32"), "--steps", "6", "--guidance", "2.5", "--apg-norm",
                            str(apg_norm), "--class-scale", str(class_scale)] + iters, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cpp = np.fromfile(out / "images.f32", np.float32).reshape(2, 3, 64, 64)
        assert np.abs(cpp - ref).max() <= min(1e-3, 0.05 * gap), (apg_norm, class_scale, class_iters,
                                                                   np.abs(cpp - ref).max(), gap)
        assert (out / "0.ppm").read_bytes().startswith(b"P6\n64 64\n255\n")


def test_cpp_ddim_spacing_matches_python(binary, tiny_weights, tmp_path, ddim_spacing):
    """--spacing leading / trailing walk python.core.diffusion.DDIM's timesteps (6 steps: T/n is not whole)."""
    from python.core.diffusion import DDIM_SPACINGS

    ex, pipe, cond, noise, files = _parity_inputs(tiny_weights, tmp_path, 3)
    refs = {}
    for spacing in DDIM_SPACINGS:
        ddim_spacing(spacing)
        refs[spacing] = pipe.decode(pipe.ldm_latents(cond, "ddim", 6, 2.5, x_T=noise))
    assert np.abs(refs["leading"] - refs["trailing"]).max() > 1e-3
    for spacing, ref in refs.items():
        out = tmp_path / spacing
        out.mkdir()
        r = subprocess.run([str(binary), str(ex), str(out), *files, "--steps", "6", "--guidance", "2.5", "--spacing",
                            spacing], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cpp = np.fromfile(out / "images.f32", np.float32).reshape(2, 3, 64, 64)
        assert np.abs(cpp - ref).max() <= 1e-3, (spacing, np.abs(cpp - ref).max())


def test_cpp_labels_and_errors(binary, tiny_weights, tmp_path):
    ex = tmp_path / "export"
    export_all(tiny_weights, ex, formats=("torchscript",))
    r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "red sphere, yellow cube", "-n", "2",
                        "--steps", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "1.ppm").exists()
    r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "grey cube"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown label 'grey cube'" in r.stderr
    r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "gray cube", "--apg-norm", "-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--apg-norm must be 0" in r.stderr
    r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "gray cube", "--class-scale", "-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--class-scale must be 0" in r.stderr
    for bad in ("0", "17"):
        r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "gray cube", "--class-iters", bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "--class-iters must be a whole number" in r.stderr
    for option, bad in (("--class-iters", "2.5"), ("--steps", "ten"), ("--seed", "-1"), ("--guidance", "")):
        r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "gray cube", option, bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and f"{option} must be a number, got '{bad}'" in r.stderr, r.stderr
    r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "gray cube", "--steps"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "option --steps has no value" in r.stderr
    r = subprocess.run([str(binary), str(ex), str(tmp_path), "--labels", "gray cube", "--spacing", "linspace"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--spacing must be trailing or leading, got 'linspace'" in r.stderr


def test_cpp_without_the_guidance_classifier_says_what_to_do(binary, tiny_weights, tmp_path):
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights, ignore=shutil.ignore_patterns("guide"))
    ex = tmp_path / "export"
    export_all(weights, ex, formats=("torchscript",))
    args = [str(binary), str(ex), str(tmp_path), "--labels", "gray cube", "-n", "1", "--steps", "2"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 2 and "class_grad.ts: not found" in r.stderr and "--class-scale 0" in r.stderr
    r = subprocess.run(args + ["--class-scale", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cpp_default_guidance_is_the_python_default():
    import re
    from pathlib import Path

    from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_CLASS_SCALE, DEFAULT_GUIDANCE

    src = (Path(__file__).resolve().parent.parent / "runtime" / "cpp" / "ldm_sample.cpp").read_text()
    assert float(re.search(r"double w = ([0-9.]+);", src).group(1)) == DEFAULT_GUIDANCE
    assert float(re.search(r"double apg = ([0-9.]+);", src).group(1)) == DEFAULT_APG_NORM
    assert float(re.search(r"double cls = ([0-9.]+);", src).group(1)) == DEFAULT_CLASS_SCALE
    assert int(re.search(r"int iters = ([0-9]+);", src).group(1)) == DEFAULT_CLASS_ITERS


def test_cpp_ddim_noise_matches_python(binary, tiny_weights, tmp_path):
    """--eta with --step-noise (python.core.noise.step_noise's draws) walks python.core.diffusion.DDIM's stochastic
    update; without the file the noise comes from --seed (reproducible, and used); bad values refused in one line."""
    from python.core.noise import step_noise

    ex, pipe, cond, x_T, files = _parity_inputs(tiny_weights, tmp_path, 4)
    draw = step_noise(7, 2, (4, 16, 16))  # what the Python runtime draws for seed 7
    np.stack([draw(i) for i in range(6)]).tofile(tmp_path / "steps.f32")
    ref = pipe.decode(pipe.ldm_latents(cond, "ddim", 6, 2.5, seed=7, eta=0.5, x_T=x_T))
    plain = pipe.decode(pipe.ldm_latents(cond, "ddim", 6, 2.5, seed=7, x_T=x_T))
    assert np.abs(ref - plain).max() > 1e-3
    base = [str(binary), str(ex)]
    args = [*files, "--steps", "6", "--guidance", "2.5"]
    out = tmp_path / "cpp"
    out.mkdir()
    r = subprocess.run(base + [str(out)] + args + ["--eta", "0.5", "--step-noise", str(tmp_path / "steps.f32")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cpp = np.fromfile(out / "images.f32", np.float32).reshape(2, 3, 64, 64)
    assert np.abs(cpp - ref).max() <= 1e-3, np.abs(cpp - ref).max()
    images = []
    for name, eta in [("a", "0.5"), ("b", "0.5"), ("c", "0")]:
        (tmp_path / name).mkdir()
        r = subprocess.run(base + [str(tmp_path / name), "--labels", "red sphere", "-n", "2", "--steps", "4",
                                   "--seed", "3", "--eta", eta], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        images.append(np.fromfile(tmp_path / name / "images.f32", np.float32))
    assert np.array_equal(images[0], images[1]) and np.abs(images[0] - images[2]).max() > 1e-3
    for bad, why in [(["--eta", "1.5"], "--eta must be in [0, 1]"),
                     (["--step-noise", str(tmp_path / "steps.f32")], "it needs --eta > 0"),
                     (["--eta", "0.5", "--step-noise", str(tmp_path / "noise.f32")],
                      "--step-noise holds 2 latents; --steps x items is 12")]:
        r = subprocess.run(base + [str(out)] + args + bad, capture_output=True, text=True)
        assert r.returncode == 2 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cpp_samples_a_layout_export_from_the_runtime_s_saved_inputs(binary, layout_export, tmp_path):
    """A layout denoiser (python/core/layout.py): runtime.generate --save-cond writes the rows with the places it drew,
    and the C++ sampler given them makes the Python runtime's images; --labels alone is refused, saying what to do."""
    from runtime.generate import Pipeline
    from runtime.generate import main as generate
    from runtime.models import ExportFolder

    _, ex = layout_export
    saved = tmp_path / "inputs"
    generate(["--export", str(ex), "--labels", "red sphere,cyan cylinder", "-n", "2", "--sampler", "ddim", "--steps",
              "4", "--guidance", "2", "--apg-norm", "0", "--class-scale", "2", "--seed", "3", "--save-cond", str(saved),
              "--out", str(tmp_path / "grid.png")])
    rows = np.fromfile(saved / "cond.f32", np.float32).reshape(2, -1)
    assert rows.shape[1] == int((ex / "layout.txt").read_text()) and (rows[:, 24:] > 0).sum() == 2 * 2 * 3
    cond = np.repeat(encode(["red sphere", "cyan cylinder"])[None], 2, axis=0)
    ref = Pipeline(ExportFolder(ex)).decode(Pipeline(ExportFolder(ex)).ldm_latents(
        cond, "ddim", 4, 2.0, seed=3, apg_norm=0.0, class_scale=2.0))
    out = tmp_path / "cpp"
    out.mkdir()
    r = subprocess.run([str(binary), str(ex), str(out), "--cond", str(saved / "cond.f32"), "--noise",
                        str(saved / "noise.f32"), "--steps", "4", "--guidance", "2", "--apg-norm", "0",
                        "--class-scale", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.abs(np.fromfile(out / "images.f32", np.float32).reshape(2, 3, 64, 64) - ref).max() <= 1e-3
    r = subprocess.run([str(binary), str(ex), str(out), "--labels", "red sphere", "--steps", "2"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "layout.txt" in r.stderr and "--save-cond" in r.stderr
