"""Object layouts (python/data/layout.py) and the denoiser that reads them (DenoiserConfig.layout)."""
import json

import numpy as np
import pytest
import torch

from python.core.diffusion import Schedule
from python.core.errors import UserError
from python.core.labels import NUM_CLASSES, OBJECTS
from python.data.dataset import read_labelled
from python.data.layout import LAYOUT_DIM, mirror, sample_layouts, scene_layout, train_layouts, with_layouts
from python.data.render import sample_scene
from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser
from python.models.sampling import ldm_latents
from python.train_ldm import main as train_ldm


def _slots(layout):
    return layout.reshape(NUM_CLASSES, 3)


def test_scene_layout_places_each_object_in_its_class_slot():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, [OBJECTS["red cube"], OBJECTS["blue sphere"]])
    full, first = _slots(scene_layout(scene)), _slots(scene_layout(scene, upto=1))
    present = np.flatnonzero(full[:, 2] > 0)
    assert sorted(present) == sorted([OBJECTS["red cube"], OBJECTS["blue sphere"]])
    assert (full[present, :2] > 0).all() and (full[present, :2] < 1).all()  # centres inside the image
    assert (full[present, 2] > 0.01).all() and (full[present, 2] < 0.3).all()  # an object, not the whole frame
    assert np.flatnonzero(first[:, 2] > 0).tolist() == [OBJECTS["red cube"]]  # the first object alone
    assert np.allclose(first[OBJECTS["red cube"]], full[OBJECTS["red cube"]])
    # two objects never share a place: the renderer keeps them apart
    a, b = full[present]
    assert np.hypot(*(a[:2] - b[:2])) > 0.02


def test_mirror_flips_only_present_objects():
    lay = np.zeros((1, LAYOUT_DIM), np.float32)
    lay[0, 3 * 5:3 * 5 + 3] = (0.2, 0.6, 0.05)
    m = _slots(mirror(lay)[0])
    assert np.allclose(m[5], (0.8, 0.6, 0.05)) and not m[np.arange(NUM_CLASSES) != 5].any()
    assert np.allclose(mirror(mirror(lay)), lay)


def test_train_layouts_recover_the_renders_and_refuse_another_seed(tiny_data, tmp_path):
    names, labels = read_labelled(tiny_data / "train.json", OBJECTS)
    lay = train_layouts(tiny_data, names, labels)
    assert lay.shape == (len(names), LAYOUT_DIM)
    assert np.array_equal(lay.reshape(len(names), NUM_CLASSES, 3)[..., 2] > 0, labels > 0.5)
    # objects are added one at a time: image k of a scene keeps the places of image k - 1
    by_name = dict(zip(names, lay))
    for n in names:
        if n.endswith("_1.png"):
            prev = by_name[n.replace("_1.png", "_0.png")].reshape(NUM_CLASSES, 3)
            cur = by_name[n].reshape(NUM_CLASSES, 3)
            assert np.allclose(cur[prev[:, 2] > 0], prev[prev[:, 2] > 0])
    assert np.array_equal(train_layouts(tiny_data, names, labels), lay)  # the cache answers the same
    # a copy whose stats.json names another seed: the re-drawn scenes do not hold the labels
    other = tmp_path / "other"
    other.mkdir()
    stats = json.loads((tiny_data / "stats.json").read_text())
    (other / "stats.json").write_text(json.dumps({**stats, "seed": stats["seed"] + 1}))
    with pytest.raises(UserError, match="does not hold its labels"):
        train_layouts(other, names, labels)
    with pytest.raises(UserError, match="no stats.json"):
        train_layouts(tmp_path, names, labels)


def test_sample_layouts_follow_the_condition_and_the_seed():
    cond = np.zeros((3, NUM_CLASSES), np.float32)
    cond[0, [1, 9]] = 1
    cond[1, 4] = 1  # row 2: the empty set
    lay = sample_layouts(cond, seed=0)
    assert np.array_equal(lay.reshape(3, NUM_CLASSES, 3)[..., 2] > 0, cond > 0.5)
    assert np.array_equal(lay, sample_layouts(cond, seed=0))
    assert not np.array_equal(lay, sample_layouts(cond, seed=1))
    assert np.array_equal(sample_layouts(cond[:1], seed=0), lay[:1])  # row i's places do not depend on the batch
    wide = with_layouts(cond, seed=0)
    assert wide.shape == (3, NUM_CLASSES + LAYOUT_DIM) and np.array_equal(wide[:, :NUM_CLASSES], cond)
    with pytest.raises(UserError, match="multi-hot"):
        sample_layouts(np.zeros((2, 5)))


def test_layout_input_starts_at_zero_and_then_moves_the_output():
    torch.manual_seed(0)
    plain = Denoiser(DenoiserConfig(width=32, depth=2, heads=2))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    lay_model = Denoiser(DenoiserConfig(width=32, depth=2, heads=2, layout=True))
    missing = lay_model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["layout_in.bias", "layout_in.weight"]
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    cond = np.zeros((2, NUM_CLASSES), np.float32)
    cond[:, [2, 13]] = 1
    wide = torch.from_numpy(with_layouts(cond, seed=4))
    with torch.no_grad():
        assert torch.allclose(lay_model(x, t, wide), plain(x, t, torch.from_numpy(cond)), atol=1e-6)  # warm start
        torch.nn.init.normal_(lay_model.layout_in.weight, std=0.05)
        moved = wide.clone()
        moved[:, NUM_CLASSES + 3 * 2] = 1 - moved[:, NUM_CLASSES + 3 * 2]  # object 2 to the other side
        assert not torch.allclose(lay_model(x, t, wide), lay_model(x, t, moved))
        # an absent class's place is ignored; the empty row is the unconditional pass
        ignored = wide.clone()
        ignored[:, NUM_CLASSES + 3 * 7:NUM_CLASSES + 3 * 8] = torch.tensor([0.5, 0.5, 0.1])
        assert torch.equal(lay_model(x, t, wide), lay_model(x, t, ignored))


def test_blobs_peak_where_the_object_stands():
    m = Denoiser(DenoiserConfig(width=32, depth=2, heads=2, layout=True))
    cond = torch.zeros(1, NUM_CLASSES)
    cond[0, 6] = 1
    places = torch.zeros(1, LAYOUT_DIM)
    places[0, 18:21] = torch.tensor([0.8, 0.27, 0.06])  # right, near the top
    b = m.blobs(cond, places)
    assert b.shape == (1, NUM_CLASSES, 16, 16) and b[0, np.arange(NUM_CLASSES) != 6].abs().max() == 0
    iy, ix = divmod(int(b[0, 6].argmax()), 16)
    assert (iy, ix) == (4, 12)  # the cells whose centres (4.5 / 16, 12.5 / 16) are nearest


def test_train_ldm_with_layouts_and_sample(tiny_data, parts, tmp_path):
    run = tmp_path / "run"
    train_ldm(["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--judge",
               str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run), "--steps", "2", "--layout",
               "--no-pooled", "--no-bf16"])
    model, cfg = load_denoiser(run / "final")
    assert cfg["denoiser"]["layout"] is True and model.cfg.cond_dim == NUM_CLASSES + LAYOUT_DIM
    cond = np.zeros((2, NUM_CLASSES), np.float32)
    cond[:, [9, 22]] = 1
    sch = Schedule(**cfg["schedule"])
    lat = ldm_latents(model, sch, cond, "ddim", 3, 2.0, seed=1)  # places drawn from the prior per seed
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()
    assert torch.equal(lat, ldm_latents(model, sch, with_layouts(cond, 1), "ddim", 3, 2.0, seed=1))
