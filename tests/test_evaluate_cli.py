import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from python.core.labels import load_conditions
from python.data.dataset import load_image64, to_model_range
from python.evaluate import main as evaluate
from python.models.judge import build_judge, load_judge, save_judge, topk_accuracy
from python.train_evaluator import main as train_evaluator


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    save_judge(build_judge("resnet18").eval(), d)
    return d / "checkpoint.pth"


def _folder_for(tiny_data, tmp_path, n):
    """Held-out renders copied as 0.png ... n-1.png, with their labels as a condition file."""
    labels = json.loads((tiny_data / "heldout_renders.json").read_text())
    names = list(labels)[:n]
    out = tmp_path / "images"
    out.mkdir()
    for i, name in enumerate(names):
        shutil.copy(tiny_data / "heldout_renders" / name, out / f"{i}.png")
    cond = tmp_path / "cond.json"
    cond.write_text(json.dumps([labels[n_] for n_ in names]))
    return out, cond


def test_scores_a_folder_like_the_course(tiny_data, tmp_path, ckpt, capsys):
    images, cond = _folder_for(tiny_data, tmp_path, 6)
    evaluate(["--images", str(images), "--conditions", str(cond), "--judge", str(ckpt)])
    res = json.loads(capsys.readouterr().out)
    x = to_model_range(np.stack([load_image64(images / f"{i}.png") for i in range(6)]))
    expected = topk_accuracy(load_judge(ckpt)(x), torch.from_numpy(load_conditions(cond)))
    assert res["accuracy"] == pytest.approx(expected) and res["n"] == 6


@pytest.mark.parametrize("damage, msg", [
    (lambda d: (d / "3.png").unlink(), "missing 1 image\\(s\\), e.g. 3.png"),
    (lambda d: Image.new("RGB", (8, 8)).save(d / "6.png"), "7 numbered images but 6 conditions"),
])
def test_folder_errors(tiny_data, tmp_path, ckpt, capsys, damage, msg):
    images, cond = _folder_for(tiny_data, tmp_path, 6)
    damage(images)
    with pytest.raises(SystemExit) as e:
        evaluate(["--images", str(images), "--conditions", str(cond), "--judge", str(ckpt)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert re.search(msg, err)


def test_wrong_checkpoint_layout(tiny_data, tmp_path, capsys):
    images, cond = _folder_for(tiny_data, tmp_path, 2)
    torch.save({"state_dict": {}}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit):
        evaluate(["--images", str(images), "--conditions", str(cond), "--judge", str(tmp_path / "bad.pth")])
    assert "expected the official layout" in capsys.readouterr().err


def test_train_evaluator_tiny(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train_evaluator(["--preset", "tiny", "--eval-data", str(tiny_data), "--cache", str(tmp_path / "cache"),
                     "--run-dir", str(run), "--no-bf16"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["accuracy"] <= 1 and set(res["by_objects"]) <= {"1", "2", "3", "4", "5"}
    ckpt = torch.load(run / "final" / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model"} and "fc.0.weight" in ckpt["model"]  # the official layout
    assert (tmp_path / "cache" / "judge-renders-seed1000-n64.npz").exists()
