"""The evaluation's object counter (python/models/counter.py, python -m python.train_counter): it reads images, counts
objects, and its figures compare the count with the number of objects requested."""
import json

import numpy as np
import pytest
import torch

from python.models.counter import ImageCounter, count_figures, load_counter, save_counter
from python.train_counter import main as train_counter


class _Says(ImageCounter):
    """A counter that reads a fixed number of objects off each image (its logits peak there)."""

    def __init__(self, totals):
        super().__init__(widths=(4, 4, 4, 4))
        self.totals = torch.as_tensor(totals)

    def forward(self, images):
        return torch.nn.functional.one_hot(self.totals[: len(images)], self.max_total + 1).float() * 10


def test_count_figures_compare_the_counted_with_the_requested_number():
    labels = np.zeros((4, 24), np.float32)
    for i, k in enumerate((1, 2, 3, 2)):
        labels[i, :k] = 1
    images = torch.zeros(4, 3, 64, 64)
    assert count_figures(_Says([1, 2, 3, 2]), images, labels) == {
        "counted_surplus": 0.0, "counted_deficit": 0.0, "counted_excess_mean": 0.0}
    # one object drawn twice, one missing, a ghost beside three, one beside two: surplus 3/4, deficit 1/4, mean +2/4
    assert count_figures(_Says([2, 1, 4, 3]), images, labels) == {
        "counted_surplus": 0.75, "counted_deficit": 0.25, "counted_excess_mean": 0.5}
    # five or more requested reads as the counter's last bin
    many = np.zeros((1, 24), np.float32)
    many[0, :7] = 1
    assert count_figures(_Says([5]), images[:1], many)["counted_surplus"] == 0.0


def test_train_counter_renders_trains_reports_and_saves(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--scenes", "40", "--steps", "3", "--batch", "8", "--workers", "1", "--run-dir", str(run),
            "--out", str(tmp_path / "w")]
    train_counter(args)
    net, cfg = load_counter(tmp_path / "w")
    assert isinstance(net, ImageCounter) and cfg["scenes"] == 40 and cfg["seed"] == 11
    assert set(cfg["heldout"]) == {"renders", "vae_reconstructions"}
    assert 0 <= cfg["heldout"]["renders"]["accuracy"] <= 1
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 6)
    rendered = np.load(run / "count-renders.npz")
    assert rendered["images"].shape[1:] == (64, 64, 3) and (rendered["counts"].sum(1) >= 1).all()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["heldout_scenes"] == 4
    train_counter(args)  # a rerun reuses the renders
    assert "rendered 40 scenes" not in (run / "log.txt").read_text().split("\n", 3)[-1]
    for bad, msg in ((["--scenes", "5"], "--scenes must be >= 20"), (["--noise", "-1"], "--noise must be >= 0"),
                     (["--steps", "0"], "--steps and --batch must be >= 1")):
        with pytest.raises(SystemExit):
            train_counter(bad + ["--run-dir", str(tmp_path / "bad")])
        assert msg in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_saved_counter_loads_with_its_shape_and_a_missing_one_is_a_clear_error(tmp_path, capsys):
    torch.manual_seed(0)
    net = ImageCounter(max_total=4, widths=(8, 8, 8, 8)).eval()
    save_counter(net, tmp_path / "c", {"note": "test"})
    again, cfg = load_counter(tmp_path / "c")
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(again(x), net(x), atol=2e-2, rtol=2e-2)  # fp16 on disk
    assert cfg["max_total"] == 4 and cfg["note"] == "test"
    from python.core.errors import UserError

    with pytest.raises(UserError, match="no object counter here"):
        load_counter(tmp_path / "nothing")
