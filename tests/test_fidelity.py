"""Fidelity figures on tiny sets: they are zero where they must be, and worse for what a person calls worse."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from python.data.dataset import to_model_range
from python.data.synthetic import render_conditions
from python.evaluation.fidelity import Reference, distribution_figures, sharpness
from python.models.judge import judge_features, load_judge


def _conditions(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cond = np.zeros((n, 24), np.float32)
    for row in cond:
        row[rng.choice(24, rng.integers(1, 4), replace=False)] = 1
    return cond


@pytest.fixture(scope="module")
def renders():
    cond = _conditions(40)
    return cond, render_conditions(cond, 1, seed=0), render_conditions(cond, 1, seed=1)


def blur(images: torch.Tensor, passes: int = 2) -> torch.Tensor:
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    k2 = (kernel[:, None] * kernel[None]).expand(3, 1, 5, 5)
    for _ in range(passes):
        images = F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), k2, groups=3)
    return images


def test_identical_sets_score_zero_and_a_shifted_set_does_not():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    same, shifted = distribution_figures(a, a.clone()), distribution_figures(a, a + 1.0)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == 1.0 and same["recall"] == 1.0
    assert shifted["fd"] == pytest.approx(16.0, rel=0.05)  # |mean shift|^2, same covariance
    assert abs(same["kid_x1000"]) < 0.01 * shifted["kid_x1000"]
    assert not same["fd_reliable"] and distribution_figures(a.repeat(4, 1), a.repeat(4, 1))["fd_reliable"]


def test_precision_drops_when_samples_leave_the_manifold():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 8, generator=g)
    on = distribution_figures(real, torch.randn(400, 8, generator=g))
    off = distribution_figures(real, torch.cat([torch.randn(200, 8, generator=g),
                                                torch.randn(200, 8, generator=g) + 6.0]))
    assert on["precision"] > 0.8 and off["precision"] < on["precision"] - 0.3
    assert off["recall"] > 0.8  # the real manifold is still covered by the half that stayed


def test_blurred_renders_score_worse_than_renders_in_the_judges_features(renders):
    cond, real_u8, other_u8 = renders
    judge2 = load_judge(which="second")
    real, other = to_model_range(real_u8), to_model_range(other_u8)
    feats = judge_features(judge2, real)
    sharp = distribution_figures(feats, judge_features(judge2, other))
    blurred = distribution_figures(feats, judge_features(judge2, blur(other)))
    assert blurred["kid_x1000"] > sharp["kid_x1000"] and blurred["fd"] > sharp["fd"]
    assert sharpness(blur(other)).mean() < 0.6 * sharpness(other).mean()


def test_reference_reports_floors_and_generated_figures(renders):
    cond, real_u8, other_u8 = renders
    ref = Reference(real_u8, other_u8, cond, load_judge(which="second"), load_judge())
    floor = ref.floors["real_vs_real"]
    assert 0.8 < floor["contrast_ratio"] < 1.25 and 0.8 < floor["sharpness_ratio"] < 1.25
    assert floor["unrequested"] <= 0.1 and floor["missing"] <= 0.1
    faded = ref.figures(to_model_range(other_u8) * 0.3 + 0.3 * 0.7)  # objects washed towards a flat gray
    assert faded["contrast_ratio"] < 0.5 * floor["contrast_ratio"] and faded["kid_x1000"] > floor["kid_x1000"]
    with pytest.raises(ValueError, match="3 images for 40 reference conditions"):
        ref.figures(to_model_range(other_u8[:3]))


def test_extra_object_analysis_splits_by_size_training_and_what_the_extra_shares():
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from extra_objects import analyse

    from python.core.labels import encode

    cond = np.stack([encode(["red sphere"]), encode(["red sphere", "blue cube"]), encode(["gray cube"])])
    probs = np.zeros((3, 24), np.float32)
    probs[0, np.argmax(encode(["red sphere"]))] = 0.95
    probs[0, np.argmax(encode(["red cube"]))] = 0.9  # a duplicated colour, below the requested object
    probs[1, np.flatnonzero(cond[1])] = 0.9
    probs[1, np.argmax(encode(["green cube"]))] = 0.95  # shares the blue cube's shape only, and outranks it
    probs[2, np.argmax(encode(["gray cube"]))] = 0.8  # right
    res = analyse(probs, cond, np.array([True, False, True]))
    assert res["extra_objects"] == {"same_colour": 1, "same_shape_only": 1, "neither": 0}
    assert res["unrequested"] == 2 / 3 and res["by_objects"][1]["unrequested"] == 0.5
    assert res["by_training_label_set"]["not_in_train"]["unrequested"] == 1.0
    assert res["by_objects"][2]["accuracy"] == 0.5  # the green cube pushes the blue cube out of the top 2
    assert res["accuracy"] == (1 + 0.5 + 1) / 3
