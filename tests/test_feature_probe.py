import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import feature_probe  # noqa: E402


def test_probe_reads_labels_from_features_that_hold_them_and_not_from_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(600, 24)
    for i in range(600):
        labels[i, torch.randperm(24, generator=g)[: 1 + i % 3]] = 1
    informative = labels @ torch.randn(24, 64, generator=g) + 0.1 * torch.randn(600, 64, generator=g)
    noise = torch.randn(600, 64, generator=g)
    assert feature_probe.probe_accuracy(informative, labels, 400) > 0.95
    assert feature_probe.probe_accuracy(noise, labels, 400) < 0.3


def test_probe_runs_on_both_networks(tiny_data, tiny_weights):
    common = ["--data", str(tiny_data), "--weights", str(tiny_weights), "--latents", "24", "--t-max", "10"]
    ldm = feature_probe.main(common)
    assert [r["input"] for r in ldm] == ["label set withheld", "label set given"]
    cls = feature_probe.main(common + ["--network", "classifier"])
    assert len(cls) == 1 and 0 <= cls[0]["accuracy"] <= 1
