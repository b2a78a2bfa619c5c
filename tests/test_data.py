import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from python.core.errors import UserError
from python.core.labels import OBJECTS, encode
from python.data.dataset import load_condition_file, load_image64, load_split, to_model_range
from python.data.render import render, sample_scene
from python.data.synthetic import make_dataset


def test_official_format_round_trip(tiny_data):
    train = json.loads((tiny_data / "train.json").read_text())
    assert len(train) == 36 and json.loads((tiny_data / "objects.json").read_text()) == OBJECTS
    # objects are added one at a time: _0 holds one object, _1 two, _2 three, each a prefix of the next
    assert train["CLEVR_train_000003_1.png"] == train["CLEVR_train_000003_2.png"][:2]
    assert len(train["CLEVR_train_000003_0.png"]) == 1
    img = Image.open(tiny_data / "iclevr" / "CLEVR_train_000000_0.png")
    assert img.mode == "RGBA" and img.size[0] * 3 == img.size[1] * 4
    ds = load_split(tiny_data, progress=False)
    assert ds.images.shape == (36, 64, 64, 3) and ds.images.dtype == np.uint8
    for i, name in enumerate(ds.names):  # render -> load -> labels match
        assert np.array_equal(ds.labels[i], encode(train[name]))
    x = to_model_range(ds.images[:4])
    assert x.shape == (4, 3, 64, 64) and -1.0 <= x.min() and x.max() <= 1.0
    for name, n in (("test.json", 32), ("new_test.json", 32), ("heldout.json", 40)):
        c = load_condition_file(tiny_data, name)
        assert c.shape == (n, 24) and set(c.sum(1).tolist()) <= {1.0, 2.0, 3.0}
    assert set(load_condition_file(tiny_data, "heldout_45.json").sum(1).tolist()) <= {4.0, 5.0}
    held = json.loads((tiny_data / "heldout_renders.json").read_text())
    assert len(held) == 24 and max(len(v) for v in held.values()) <= 5
    stats = json.loads((tiny_data / "stats.json").read_text())
    assert stats["heldout_conditions_absent_from_train"] > 0  # includes unseen combinations
    assert Image.open(tiny_data / "contact_sheet.png").size[0] == 8 * 160


def test_preprocessing_matches_course_loader(tiny_data):
    """RGB, 64x64 bilinear resize without crop, ToTensor, Normalize(0.5, 0.5): as torchvision does it."""
    import torchvision.transforms as T

    path = tiny_data / "iclevr" / "CLEVR_train_000001_2.png"
    course = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    ref = course(Image.open(path).convert("RGB"))
    ours = to_model_range(load_image64(path)[None])[0]
    assert (ours - ref).abs().max() < 1e-6


def test_any_image_mode_and_size(tmp_path):
    for mode, size in (("RGBA", (320, 240)), ("RGB", (100, 50)), ("L", (64, 64))):
        Image.new(mode, size, 128).save(tmp_path / f"{mode}.png")
        assert load_image64(tmp_path / f"{mode}.png").shape == (64, 64, 3)


def test_cache_reused_and_rebuilt_on_change(tiny_data):
    first = load_split(tiny_data, progress=False)
    caches = list((tiny_data / ".cache").glob("train-*.npy"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    assert np.array_equal(load_split(tiny_data, progress=False).images, first.images)
    assert caches[0].stat().st_mtime_ns == mtime  # read, not rebuilt
    path = tiny_data / "iclevr" / "CLEVR_train_000000_0.png"
    original = path.read_bytes()
    try:
        Image.new("RGB", (160, 120), (255, 0, 0)).save(path)
        changed = load_split(tiny_data, progress=False)
        assert (changed.images[0] == [255, 0, 0]).all()
        assert len(list((tiny_data / ".cache").glob("train-*.npy"))) == 1
    finally:
        path.write_bytes(original)


def _copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst


@pytest.mark.parametrize("edit, msg", [
    (lambda r: (r / "train.json").write_text('{"CLEVR_train_000000_0.png": ["grey cube"]}'),
     "train.json: CLEVR_train_000000_0.png: unknown label 'grey cube'; valid names are: gray cube"),
    (lambda r: (r / "train.json").write_text('{"CLEVR_train_000000_0.png": ["red cube", "red cube"]}'),
     "repeated"),
    (lambda r: (r / "train.json").write_text('{"CLEVR_train_000000_0.png": []}'), "empty label list"),
    (lambda r: (r / "train.json").write_text('{"x.png": ["red cube"]}'), "x.png: image not found"),
    (lambda r: (r / "train.json").write_text('{"a": '), "train.json: malformed JSON"),
    (lambda r: (r / "objects.json").write_text('{"red cube": 1}'), "objects.json must map each name"),
    (lambda r: (r / "iclevr" / "CLEVR_train_000000_0.png").write_bytes(b"not a png"), "not a readable image"),
])
def test_bad_dataset_errors(tiny_data, tmp_path, edit, msg):
    root = _copy_dataset(tiny_data, tmp_path / "ds")
    edit(root)
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        load_split(root, progress=False)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "python.make_data", "--out", str(tmp_path), "--size", "banana"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --size")


def test_deterministic_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", scenes=3, seed=3, heldout_images=2, heldout_conditions=8, workers=1)
    b = make_dataset(tmp_path / "b", scenes=3, seed=3, heldout_images=2, heldout_conditions=8, workers=2)
    digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()  # noqa: E731
                           for p in sorted(root.rglob("*")) if p.is_file() and p.name != "stats.json"}
    assert digest(tmp_path / "a") == digest(tmp_path / "b") and a["train"] == b["train"]
    c = make_dataset(tmp_path / "c", scenes=3, seed=4, heldout_images=2, heldout_conditions=8, workers=1)
    assert c["train"] != a["train"] or digest(tmp_path / "c") != digest(tmp_path / "a")


def test_render_objects_visible_and_distinct():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, [OBJECTS["red sphere"], OBJECTS["yellow cube"], OBJECTS["cyan cylinder"],
                               OBJECTS["gray cube"], OBJECTS["blue sphere"]])
    img, visible, alone = render(scene, ids=True)
    assert img.shape == (120, 160, 4) and (img[..., 3] == 255).all()
    assert all(v >= 0.55 * a and v >= 12 for v, a in zip(visible, alone))
    assert scene.labels == ["red sphere", "yellow cube", "cyan cylinder", "gray cube", "blue sphere"]
    # the red sphere's pixels are red-dominant, the floor is gray
    floor = render(scene, upto=0)
    assert abs(int(floor[60, 80, 0]) - int(floor[60, 80, 2])) < 12
