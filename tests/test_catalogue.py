"""The bad-input catalogue: every entry point a user types, fed what users get wrong (the hardening issue's list, and
the cases that were already handled), answers with exit status != 0 and one line that names the problem and what is
valid: no traceback, and nothing half-written where the output would have gone. The server's own catalogue is in
test_serve.py (HTTP 4xx with a reason) and the parsers are fuzzed in test_fuzz.py."""
import importlib
import json
import shutil
from pathlib import Path

import pytest

BAD_UTF8 = b'[["red sphere"], ["\xff\xfe cube"]]'


def _case(module, argv, words, out=None):
    if module == "runtime.generate" and "--export" not in argv:
        argv = [*argv, "--export", "{export}"]
    return pytest.param(module, argv, words, out, id=f"{module.split('.')[-1]}: {' '.join(argv)[:60]}")


@pytest.fixture(scope="module")
def broken(tiny_weights, onnx_export, tiny_data, tmp_path_factory):
    """Damaged copies of the fixtures, by name: what a full disk, a killed copy or a hand edit leaves behind."""
    root = tmp_path_factory.mktemp("broken")
    paths = {}
    weights = root / "weights_truncated_ldm"
    shutil.copytree(tiny_weights, weights)
    den = weights / "ldm" / "denoiser.safetensors"
    den.write_bytes(den.read_bytes()[:500])  # truncated
    paths["weights_truncated_ldm"] = weights
    vae = root / "vae_bad_config"
    shutil.copytree(tiny_weights / "vae", vae)
    cfg = json.loads((vae / "config.json").read_text())
    cfg["vae"] = {**cfg.get("vae", {}), "chanels": [16, 8]}  # misspelt key
    (vae / "config.json").write_text(json.dumps(cfg))
    paths["vae_misspelt"] = vae
    vae2 = root / "vae_bad_json"
    shutil.copytree(tiny_weights / "vae", vae2)
    (vae2 / "config.json").write_text('{"vae": {"channels": [16, 8]')
    paths["vae_bad_json"] = vae2
    ex = root / "export_bad_manifest"
    shutil.copytree(onnx_export, ex)
    (ex / "manifest.json").write_text('{"labels": [1, 2], "models": 7}')
    paths["export_bad_manifest"] = ex
    ex2 = root / "export_truncated"
    shutil.copytree(onnx_export, ex2)
    g = ex2 / "generator.onnx"
    g.write_bytes(g.read_bytes()[:300])
    paths["export_truncated"] = ex2
    (root / "bad_utf8.json").write_bytes(BAD_UTF8)
    (root / "malformed.json").write_text('[["red sphere"], ["gray cube"')
    (root / "unknown.json").write_text('[["red sphere"], ["pink cube"]]')
    (root / "empty.json").write_text("[]")
    (root / "repeated.json").write_text('[["red sphere", "red sphere"]]')
    (root / "a_file").write_text("")
    images = root / "images"
    images.mkdir()
    (images / "0.png").write_bytes(b"not a png")
    (images / "1.png").write_bytes(b"")
    paths.update(root=root, images=images)
    return paths


PLAIN_TEACHER = ("--ldm", "{weights}/ldm", "--vae", "{weights}/vae", "--init", "none")
CASES = [
    # runtime.generate (no torch): counts, numbers, outputs, condition files, export folders
    _case("runtime.generate", ["--labels", "red sphere", "-n", "100000000", "--model", "gan", "--out", "{tmp}/x.png"],
          ["-n must be between 1 and 65536"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "ldm", "--guidance", "nan", "--out", "{tmp}/x.png"],
          ["--guidance must be between"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "ldm", "--eta", "2", "--out", "{tmp}/x.png"],
          ["--eta must be between 0.0 and 1.0"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "ldm", "--steps", "5000", "--out", "{tmp}/x.png"],
          ["--steps must be between 1 and 1000"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "red sphere", "-n", "0", "--model", "gan", "--out", "{tmp}/x.png"],
          ["-n must be between"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "pink cube", "--model", "gan", "--out", "{tmp}/x.png"],
          ["unknown label 'pink cube'", "valid names"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "gan", "--out", "{tmp}/x"],
          ["ending in .png"], "{tmp}/x"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "gan", "--out", "{broken}/a_file/x.png"],
          ["is a file, not a folder"], None),
    _case("runtime.generate", ["--conditions", "{broken}/bad_utf8.json", "--model", "gan", "--out", "{tmp}/o"],
          ["not UTF-8"], "{tmp}/o"),
    _case("runtime.generate", ["--conditions", "{broken}/malformed.json", "--model", "gan", "--out", "{tmp}/o"],
          ["malformed JSON"], "{tmp}/o"),
    _case("runtime.generate", ["--conditions", "{broken}/unknown.json", "--model", "gan", "--out", "{tmp}/o"],
          ["[1]", "unknown label 'pink cube'"], "{tmp}/o"),
    _case("runtime.generate", ["--conditions", "{broken}/empty.json", "--model", "gan", "--out", "{tmp}/o"],
          ["non-empty"], "{tmp}/o"),
    _case("runtime.generate", ["--conditions", "{broken}/repeated.json", "--model", "gan", "--out", "{tmp}/o"],
          ["repeated"], "{tmp}/o"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "gan", "--export", "{broken}/export_bad_manifest",
                               "--out", "{tmp}/x.png"], ["not an export manifest"], "{tmp}/x.png"),
    _case("runtime.generate", ["--labels", "red sphere", "--model", "gan", "--export", "{broken}/export_truncated",
                               "--out", "{tmp}/x.png"], ["generator.onnx", "checksum differs"], "{tmp}/x.png"),
    # the judge on a folder of images
    _case("python.evaluate", ["--images", "{broken}/images", "--conditions", "{data}/test.json"],
          ["0.png"], None),
    _case("python.evaluate", ["--images", "{tmp}/nowhere", "--conditions", "{data}/test.json"], ["nowhere"], None),
    _case("python.evaluate", ["--images", "{broken}/images", "--conditions", "{broken}/bad_utf8.json"],
          ["not UTF-8"], None),
    # generators evaluated from torch weights
    _case("python.eval_gen", ["--model", "ldm", "--weights", "{broken}/weights_truncated_ldm", "--data", "{data}",
                              "--seeds", "0", "--steps", "2", "--no-fidelity"], ["denoiser.safetensors"], None),
    _case("python.eval_vae", ["--data", "{data}", "--vae", "{broken}/vae_bad_json"], ["config.json"], None),
    _case("python.eval_vae", ["--data", "{data}", "--vae", "{broken}/vae_misspelt"], ["config.json"], None),
    # export
    _case("export.to_onnx", ["--weights", "{broken}/weights_truncated_ldm", "--out", "{tmp}/ex"],
          ["denoiser.safetensors"], "{tmp}/ex"),
    _case("export.to_onnx", ["--weights", "{tmp}/nowhere", "--out", "{tmp}/ex"], ["weights folder not found"], "{tmp}/ex"),
    _case("export.to_onnx", ["--out", "{broken}/images"], ["not an export folder"], None),
    # trainers: counts and rates refused before a run folder is made
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--steps", "0", "--run-dir", "{tmp}/run"],
          ["--steps must be a positive integer, got 0"], "{tmp}/run"),
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--steps", "-5", "--run-dir", "{tmp}/run"],
          ["--steps must be a positive integer, got -5"], "{tmp}/run"),
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--save-every", "0", "--run-dir", "{tmp}/run"],
          ["--save-every must be a positive integer"], "{tmp}/run"),
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--lr", "nan", "--run-dir", "{tmp}/run"],
          ["--lr must be in [0, inf), got nan"], "{tmp}/run"),
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--count-scenes", "100", "--count-fraction", "1",
                               "--run-dir", "{tmp}/run"], ["--count-fraction must be in (0, 1), got 1"], "{tmp}/run"),
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--count-scenes", "3", "--run-dir", "{tmp}/run"],
          ["--count-scenes must be 0 (none) or >= 10, got 3"], "{tmp}/run"),
    _case("python.train_gan", ["--preset", "tiny", "--data", "{data}", "--batch", "0", "--run-dir", "{tmp}/run"],
          ["--batch must be a positive integer"], "{tmp}/run"),
    _case("python.train_gan", ["--preset", "tiny", "--data", "{data}", "--eval-every", "0", "--run-dir", "{tmp}/run"],
          ["--eval-every must be a positive integer"], "{tmp}/run"),
    _case("python.train_vae", ["--preset", "tiny", "--data", "{data}", "--steps", "0", "--run-dir", "{tmp}/run"],
          ["--steps must be a positive integer"], "{tmp}/run"),
    _case("python.train_decoder", ["--preset", "tiny", "--data", "{data}", "--batch", "0", "--run-dir", "{tmp}/run"],
          ["--batch must be a positive integer"], "{tmp}/run"),
    _case("python.train_classifier", ["--data", "{data}", "--steps", "0", "--run-dir", "{tmp}/run"],
          ["--steps", "must be >= 1"], "{tmp}/run"),
    _case("python.train_counter", ["--scenes", "3", "--run-dir", "{tmp}/run"], ["--scenes must be >= 20"], "{tmp}/run"),
    _case("python.train_counter", ["--vae", "{tmp}/novae", "--run-dir", "{tmp}/run"], ["no VAE here"], "{tmp}/run"),
    _case("python.train_ldm", ["--preset", "tiny", "--data", "{data}", "--stop-after", "nan", "--run-dir", "{tmp}/run"],
          ["--stop-after must be a number of minutes >= 0"], "{tmp}/run"),
    _case("python.train_evaluator", ["--preset", "tiny", "--steps", "0", "--run-dir", "{tmp}/run"],
          ["--steps must be a positive integer"], "{tmp}/run"),
    _case("python.distill", ["train", "--pairs", "{tmp}/pairs", "--steps", "0", "--run-dir", "{tmp}/run"],
          ["--steps must be >= 1"], "{tmp}/run"),
    _case("python.adversarial", ["--data", "{data}", "--d-t-max", "0", "--run-dir", "{tmp}/run"],
          ["--d-t-max must be a positive integer"], "{tmp}/run"),
    # (the checks that need the teacher loaded: a plain one, the tiny weights' 2-block LDM, since the shipped LDM is a
    # layout model that these trainers refuse first)
    _case("python.adversarial", ["--data", "{data}", "--preset", "tiny", "--d-layers", "99", *PLAIN_TEACHER,
                                 "--run-dir", "{tmp}/run"],
          ["--d-layers must be block indices in 0..1, got [99]"], "{tmp}/run"),
    _case("python.adversarial", ["--data", "{data}", "--preset", "tiny", "--d-features", "classifier", *PLAIN_TEACHER,
                                 "--run-dir", "{tmp}/run"],
          ["--d-features classifier needs --d-classifier"], "{tmp}/run"),
    _case("python.adversarial", ["--data", "{data}", "--preset", "tiny", "--mismatch", "-1", "--run-dir", "{tmp}/run"],
          ["--mismatch must be in [0, inf)"], "{tmp}/run"),
    _case("python.adversarial", ["--data", "{data}", "--preset", "tiny", "--adv-weight", "0", "--dmd-weight", "1",
                                 "--count-weight", "1", *PLAIN_TEACHER, "--run-dir", "{tmp}/run"],
          ["--count-weight needs --counter"], "{tmp}/run"),
    # the server refuses to start on bad settings or a broken export (its requests: test_serve.py)
    _case("runtime.serve", ["--max-n", "0"], ["--max-n"], None),
    _case("runtime.serve", ["--timeout", "0"], ["--timeout > 0"], None),
    _case("runtime.serve", ["--export", "{broken}/export_truncated"], ["generator.onnx", "checksum differs"], None),
]


@pytest.mark.parametrize("module, argv, words, out", CASES)
def test_bad_input_is_one_line_and_leaves_nothing_behind(module, argv, words, out, tiny_data, onnx_export, broken,
                                                          tiny_weights, tmp_path, capsys):
    fill = lambda s: s.format(tmp=tmp_path, broken=broken["root"], data=tiny_data, export=onnx_export,  # noqa: E731
                              weights=tiny_weights)
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main([fill(a) for a in argv])
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    message = err.splitlines()[-1]  # argparse's own errors come after its usage line
    assert message.startswith(("error:", f"{Path(module).name}: error:")) or ": error: " in message, err
    assert all(w in message for w in words), message
    if out:
        assert not Path(fill(out)).exists()  # nothing half-written at the output path
