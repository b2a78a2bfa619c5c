import subprocess
import sys

import numpy as np
import pytest
import torch

from export.to_onnx import export_all
from python.core.errors import UserError
from python.models.judge import build_judge, judge_probs, load_judge, save_judge, topk_hits


@pytest.fixture(scope="module")
def judge_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_judge(build_judge("resnet18").eval(), root / "judge")
    save_judge(build_judge("vgg").eval(), root / "judge2")
    return root


def test_judge_onnx_and_torchscript_match_torch(judge_weights, tmp_path):
    m = export_all(judge_weights, tmp_path, formats=("onnx", "torchscript"))
    assert {"judge", "judge2", "judge_ts", "judge2_ts"} <= set(m["models"])
    assert all(e["verified_max_rel_err"] <= 1e-4 for e in m["models"].values())
    assert m["labels"][0] == "gray cube" and len(m["labels"]) == 24
    from runtime.judge import topk_hits as runtime_topk_hits
    from runtime.models import ExportFolder

    ex = ExportFolder(tmp_path)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(40, 3, 64, 64, generator=g) * 2 - 1
    labels = np.zeros((40, 24), np.float32)
    for i in range(40):
        labels[i, torch.randperm(24, generator=g)[: 1 + i % 5]] = 1
    for name, which in (("judge", "judge"), ("judge2", "judge2")):
        net = load_judge(judge_weights / which / "judge.safetensors")
        logits = ex.run(name, {"images": images.numpy()})[1]
        probs = ex.run(name, {"images": images.numpy()})[0]
        assert np.abs(probs - judge_probs(net, images).numpy()).max() < 1e-4
        ours, k = runtime_topk_hits(logits, labels)
        ref, k_ref = topk_hits(judge_probs(net, images), torch.from_numpy(labels))
        assert (ours == ref).all() and (k == k_ref).all()


def test_runtime_does_not_import_torch(judge_weights, tmp_path):
    export_all(judge_weights, tmp_path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\nfrom runtime.models import ExportFolder\nfrom runtime.judge import accuracy\n"
            f"ex = ExportFolder({str(tmp_path)!r})\n"
            "lab = np.zeros((2, 24), np.float32); lab[:, 0] = 1\n"
            "print(accuracy(ex, np.zeros((2, 3, 64, 64), np.float32), lab))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 0.0 <= float(r.stdout) <= 1.0


def test_export_errors(tmp_path, judge_weights):
    from runtime.models import ExportFolder

    with pytest.raises(UserError, match="no manifest.json"):
        ExportFolder(tmp_path / "nowhere")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder cannot be created under a file, even by root
    with pytest.raises(UserError, match="not writable"):
        export_all(judge_weights, blocker / "sub")


def test_export_is_atomic_a_failed_one_leaves_the_previous_export_whole(judge_weights, tmp_path, monkeypatch):
    import export.to_onnx as to_onnx

    out = tmp_path / "export"
    export_all(judge_weights, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = to_onnx.export_onnx, []

    def dies_on_the_second(*a, **k):  # the first network written, then the process fails (disk full, a bug...)
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(to_onnx, "export_onnx", dies_on_the_second)
    with pytest.raises(OSError):
        export_all(judge_weights, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
    monkeypatch.setattr(to_onnx, "export_onnx", real)
    export_all(judge_weights, out)  # a good export replaces it
    assert sorted(p.name for p in out.iterdir()) == sorted(before)

    elsewhere = tmp_path / "notes"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("not an export")
    with pytest.raises(UserError, match="not an export folder"):
        export_all(judge_weights, elsewhere)
    assert (elsewhere / "mine.txt").read_text() == "not an export"
