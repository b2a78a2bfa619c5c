import numpy as np
import pytest
import torch
import torchvision

from python.core.errors import UserError
from python.models.judge import build_judge, judge_score, load_judge, save_judge, topk_accuracy, topk_hits


def _reference_accuracy(out, onehot):
    """The course's evaluator.compute_acc, verbatim in logic."""
    acc = total = 0
    for i in range(out.size(0)):
        k = int(onehot[i].sum().item())
        total += k
        _, outi = out[i].topk(k)
        _, li = onehot[i].topk(k)
        for j in outi:
            if j in li:
                acc += 1
    return acc / total


def test_checkpoint_round_trip_official_layout(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    ref.fc = torch.nn.Sequential(torch.nn.Linear(512, 24), torch.nn.Sigmoid())
    ref.eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "checkpoint.pth")
    net = load_judge(tmp_path / "checkpoint.pth")
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(net(x), ref(x))
    save_judge(net, tmp_path / "out")  # ours -> official layout and fp16 safetensors
    assert torch.equal(load_judge(tmp_path / "out" / "checkpoint.pth")(x), ref(x))
    assert (load_judge(tmp_path / "out" / "judge.safetensors")(x) - ref(x)).abs().max() < 2e-3


def test_second_judge_round_trip(tmp_path):
    net = build_judge("vgg").eval()
    save_judge(net, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(load_judge(tmp_path / "checkpoint.pth")(x), net(x))


def test_accuracy_hand_computed():
    labels = torch.zeros(5, 24)
    out = torch.zeros(5, 24)
    labels[0, 3] = 1; out[0, 3] = 0.9  # k=1 hit                                         # noqa: E702
    labels[1, [1, 2]] = 1; out[1, [1, 5]] = 0.8  # k=2, 1 hit                          # noqa: E702
    labels[2, [0, 1, 2]] = 1; out[2, [7, 8, 9]] = 0.9  # k=3, 0 hits                  # noqa: E702
    labels[3, [0, 1, 2, 3]] = 1; out[3, [0, 1, 2, 3]] = 0.7  # k=4, 4 hits            # noqa: E702
    labels[4, [4, 5, 6, 7, 8]] = 1; out[4, [4, 5, 6, 10, 11]] = 0.6  # k=5, 3 hits   # noqa: E702
    hits, total = topk_hits(out, labels)
    assert hits.tolist() == [1, 1, 0, 4, 3] and total.tolist() == [1, 2, 3, 4, 5]
    assert topk_accuracy(out, labels) == pytest.approx(9 / 15)


def test_accuracy_matches_official_with_ties():
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(300, 24)
    for i in range(300):
        labels[i, torch.randperm(24, generator=g)[: 1 + i % 5]] = 1
    # saturated sigmoid outputs: many exact ties at 1.0 and 0.0, as a confident judge produces
    out = torch.sigmoid(torch.randint(-3, 4, (300, 24), generator=g).float() * 40)
    assert topk_accuracy(out, labels) == _reference_accuracy(out, labels)


def test_score_by_objects():
    net = build_judge("vgg").eval()
    labels = np.zeros((4, 24), np.float32)
    labels[0, 0] = labels[1, :2] = labels[2, :2] = labels[3, :3] = 1
    res = judge_score(net, torch.zeros(4, 3, 64, 64), labels)
    assert set(res["by_objects"]) == {1, 2, 3} and 0 <= res["accuracy"] <= 1 and res["n"] == 4
    with pytest.raises(UserError, match=r"shape \(N, 3, 64, 64\)"):
        judge_score(net, torch.zeros(4, 3, 32, 32), labels)


def test_loads_checkpoint_saved_from_another_device_map(tmp_path):
    """A checkpoint whose tensors are tagged with a CUDA device loads on a CPU-only machine."""
    net = build_judge("resnet18")
    state = net.state_dict()
    torch.save({"model": state}, tmp_path / "c.pth")
    import io
    import zipfile

    # Re-tag storages as if saved on cuda:0 by rewriting the location strings in the archive.
    with zipfile.ZipFile(tmp_path / "c.pth") as zin, zipfile.ZipFile(tmp_path / "cuda.pth", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(item, data)
    with zipfile.ZipFile(tmp_path / "cuda.pth") as z:
        assert b"cuda:0" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with pytest.raises(RuntimeError):  # torch itself cannot load it without a map_location
        torch.load(io.BytesIO((tmp_path / "cuda.pth").read_bytes()), weights_only=True)
    loaded = load_judge(tmp_path / "cuda.pth")
    assert next(loaded.parameters()).device.type == "cpu"


@pytest.mark.parametrize("content, msg", [
    (lambda p: p.write_bytes(b"garbage"), "not a readable torch checkpoint"),
    (lambda p: torch.save({"state_dict": {}}, p), "found \\['state_dict'\\]; expected the official layout"),
    (lambda p: torch.save({"model": {"conv.weight": torch.zeros(1)}}, p), "does not match the judge"),
    (lambda p: torch.save([1, 2], p), "found list; expected the official layout"),
])
def test_bad_checkpoints(tmp_path, content, msg):
    p = tmp_path / "checkpoint.pth"
    content(p)
    with pytest.raises(UserError, match=msg):
        load_judge(p)
    with pytest.raises(UserError, match="not found"):
        load_judge(tmp_path / "nope.pth")
