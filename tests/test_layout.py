"""Object layouts (python/data/layout.py) and the denoiser that reads them (DenoiserConfig.layout)."""
import json
import shutil

import numpy as np
import pytest
import torch

from python.core.diffusion import Schedule
from python.core.errors import UserError
from python.core.labels import NUM_CLASSES, OBJECTS
from python.core.layout import BANK_FILE, LAYOUT_DIM, SHAPE_OF, LayoutBank
from python.data.dataset import read_labelled
from python.data.layout import make_bank, mirror, scene_layout, train_layouts
from python.data.render import sample_scene
from python.models.denoiser import Denoiser, DenoiserConfig, load_denoiser
from python.models.sampling import ldm_latents
from python.ship import main as ship
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


def test_bank_holds_renderer_scenes_with_a_box_per_shape(layout_bank, tmp_path):
    assert sorted(layout_bank.slots) == [1, 2, 3] and layout_bank.slots[3].shape == (6, 3, 3, 3)
    s = layout_bank.slots[2]
    assert (s[..., :2] > 0).all() and (s[..., :2] < 1).all() and (s[..., 2] > 0.01).all()
    assert np.allclose(s[..., 0, 0], s[..., 1, 0], atol=0.02)  # the same place, whatever the shape...
    assert (s[..., 0, 2] < s[..., 1, 2]).all()  # ...but a cube's box is smaller than a sphere's of the same size
    assert np.array_equal(make_bank(per_count=6, max_objects=3, seed=2, workers=1).slots[3], layout_bank.slots[3])
    layout_bank.save(tmp_path)
    back = LayoutBank.load(tmp_path)
    assert np.allclose(back.slots[2], layout_bank.slots[2], atol=1e-3)  # stored as fp16
    (tmp_path / BANK_FILE).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a layout bank"):
        LayoutBank.load(tmp_path)
    with pytest.raises(UserError, match="not found"):
        LayoutBank.load(tmp_path / "nowhere")


def test_bank_draws_follow_the_condition_and_the_seed(layout_bank):
    cond = np.zeros((3, NUM_CLASSES), np.float32)
    cond[0, [1, 9]] = 1  # red cube, red sphere
    cond[1, 4] = 1  # row 2: the empty set
    lay = layout_bank.draw(cond, seed=0)
    slots = lay.reshape(3, NUM_CLASSES, 3)
    assert np.array_equal(slots[..., 2] > 0, cond > 0.5)
    assert np.array_equal(lay, layout_bank.draw(cond, seed=0))
    assert np.array_equal(layout_bank.draw(cond[:1], seed=0), lay[:1])  # row i does not depend on the batch
    assert any(not np.array_equal(lay, layout_bank.draw(cond, seed=s)) for s in (1, 2, 3))
    # every object takes a box of one bank scene of its count, the box of its own shape
    scenes = layout_bank.slots[2]
    for c in (1, 9):
        assert np.isclose(scenes[:, :, SHAPE_OF[c]], slots[0, c]).all(-1).any()
    rows = layout_bank.condition_rows(cond, seed=0)
    assert rows.shape == (3, NUM_CLASSES + LAYOUT_DIM) and np.array_equal(rows[:, :NUM_CLASSES], cond)
    with pytest.raises(UserError, match="multi-hot"):
        layout_bank.draw(np.zeros((2, 5)))
    four = np.zeros((1, NUM_CLASSES), np.float32)
    four[0, :4] = 1
    with pytest.raises(UserError, match="asks for 4 objects"):
        layout_bank.draw(four)


def test_layout_input_starts_at_zero_and_then_moves_the_output(layout_bank):
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
    wide = torch.from_numpy(layout_bank.condition_rows(cond, seed=4))
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


def test_train_ldm_with_layouts_ship_and_sample(tiny_data, parts, tmp_path):
    run = tmp_path / "run"
    train_ldm(["--preset", "tiny", "--data", str(tiny_data), "--vae", str(parts / "vae"), "--judge",
               str(parts / "judge" / "checkpoint.pth"), "--run-dir", str(run), "--steps", "2", "--layout",
               "--no-pooled", "--no-bf16"])
    assert sorted(LayoutBank.load(run).slots) == [1, 2, 3, 4, 5] and len(LayoutBank.load(run).slots[5]) == 8
    ship(["ldm", "--run", str(run), "--out", str(tmp_path / "shipped")])
    for folder in (run / "final", tmp_path / "shipped"):
        model, cfg = load_denoiser(folder)
        assert cfg["denoiser"]["layout"] is True and model.cfg.cond_dim == NUM_CLASSES + LAYOUT_DIM
        assert np.allclose(model.layout_bank.slots[2], LayoutBank.load(run).slots[2])
    cond = np.zeros((2, NUM_CLASSES), np.float32)
    cond[:, [9, 22]] = 1
    sch = Schedule(**cfg["schedule"])
    lat = ldm_latents(model, sch, cond, "ddim", 3, 2.0, seed=1)  # places drawn from the bank per seed
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()
    assert torch.equal(lat, ldm_latents(model, sch, model.layout_bank.condition_rows(cond, 1), "ddim", 3, 2.0, seed=1))
    del model.layout_bank
    with pytest.raises(UserError, match="placement prior"):
        ldm_latents(model, sch, cond, "ddim", 3, 2.0, seed=1)


def test_runtime_draws_the_same_places_as_torch(layout_export, tmp_path):
    from python.models.classifier import load_class_grad
    from python.models.sampling import decode
    from python.models.vae import Decoder, load_vae
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    root, out = layout_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["denoiser"]["layout"] == BANK_FILE and manifest["layout_bank"]["file"] == BANK_FILE
    cond = np.zeros((3, NUM_CLASSES), np.float32)
    cond[0, [9, 7, 22]] = 1
    cond[1, 0] = 1
    cond[2, [2, 11]] = 1
    pipe = Pipeline(ExportFolder(out))
    seeds = [(5, 2), (6, 1)]
    ours = pipe.decode(pipe.ldm_latents(cond, "dpmpp", 6, 3.0, batch=2, seeds=seeds, apg_norm=2.0, class_scale=2.0))
    model, cfg = load_denoiser(root / "ldm")
    sch = Schedule(**cfg["schedule"])
    grad = load_class_grad(root / "guide", root / "vae")
    ref = decode(Decoder(load_vae(root / "vae")), ldm_latents(model, sch, cond, "dpmpp", 6, 3.0, seeds=seeds,
                                                              apg_norm=2.0, class_grad=grad, class_scale=2.0))
    assert np.abs(ours - ref.numpy()).max() <= 1e-3
    other = ldm_latents(model, sch, cond, "dpmpp", 6, 3.0, seeds=[(5, 2), (7, 1)], apg_norm=2.0)
    same = ldm_latents(model, sch, cond, "dpmpp", 6, 3.0, seeds=seeds, apg_norm=2.0)
    # each seed part is its own (noise and places)
    assert torch.equal(other[:2], same[:2]) and not torch.equal(other[2], same[2])
    # a bank that is not the one exported is refused (on a copy: the export is shared)
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / BANK_FILE).write_bytes((copy / BANK_FILE).read_bytes()[:-8] + b"damaged!")
    with pytest.raises(UserError, match="checksum"):
        Pipeline(ExportFolder(copy)).ldm_latents(cond, "ddim", 2, 1.0, class_scale=0.0)


def test_tools_that_feed_label_sets_alone_refuse_a_layout_denoiser(layout_export, tmp_path, capsys):
    root, _ = layout_export
    with pytest.raises(UserError, match="python.adversarial calls its network with label sets alone"):
        load_denoiser(root / "ldm", layout_for="python.adversarial")
    from python.distill_ldm import main as distill_ldm

    with pytest.raises(SystemExit):
        distill_ldm(["trajectories", "--ldm", str(root / "ldm"), "--out", str(tmp_path / "t.npz"), "--data",
                     str(tmp_path)])
    assert "a layout denoiser" in capsys.readouterr().err and not (tmp_path / "t.npz").exists()


def test_int8_calibration_feeds_a_layout_denoiser_its_places(layout_bank, tiny_data, tiny_weights):
    from export.quantize import model_inputs
    from python.training.latents import load_latents

    lat = load_latents(tiny_data, tiny_weights / "vae")
    entry = {"schedule": Schedule("cosine", prediction="v_prediction").config(), "layout": BANK_FILE}
    batches = model_inputs("denoiser", entry, lat, 16, seed=1, batch=8, bank=layout_bank)
    cond = np.concatenate([b["cond"] for b in batches])
    assert cond.shape == (16, NUM_CLASSES + LAYOUT_DIM)
    kept = cond[:, :NUM_CLASSES].sum(1) > 0  # the guidance's unconditional half: no objects and no places
    assert kept.any() and not kept.all() and not cond[~kept].any()
    assert np.array_equal(cond[kept, NUM_CLASSES:].reshape(-1, NUM_CLASSES, 3)[..., 2] > 0, cond[kept, :NUM_CLASSES] > 0)


def test_a_layout_student_draws_its_own_places_in_torch_and_the_runtime(layout_export):
    """A one-step student of a layout LDM (python/models/generators.py): its placement prior travels with its weights
    and into the export beside (not instead of) the denoiser's, and torch and the ONNX runtime draw the same places
    for the same seeds (the Triton backend: tests/test_triton.py)."""
    from python.core.layout import GENERATOR_BANK_FILE
    from python.core.sampling import one_step_latents
    from python.models.generators import load_generator, reads_layout
    from python.models.sampling import gan_latents, torch_call
    from runtime.generate import Pipeline
    from runtime.models import ExportFolder

    root, out = layout_export
    gen, _ = load_generator(root / "gan")
    assert reads_layout(gen) and gen.cfg.cond_dim == NUM_CLASSES + LAYOUT_DIM
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["generator"]["layout"] == GENERATOR_BANK_FILE
    ex = ExportFolder(out, threads=2)
    assert len(ex.generator_layout_bank.slots[2]) == 5 and len(ex.layout_bank.slots[2]) == 6  # two priors, apart
    cond = np.zeros((3, NUM_CLASSES), np.float32)
    cond[0, [9, 7, 22]] = 1
    cond[1, 0] = 1
    cond[2, [2, 11]] = 1
    seeds = [(5, 2), (6, 1)]
    ours = Pipeline(ex).gan_latents(cond, seeds=seeds)
    ref = gan_latents(gen, cond, seeds=seeds).numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    # the rows it drew are the prior's for those seeds; other places (same noise) give another image
    rows = gen.layout_bank.condition_rows(cond, seeds=seeds)
    assert np.array_equal(one_step_latents(torch_call(gen), rows, gen.cfg.z_dim, seeds=seeds), ref)
    moved = one_step_latents(torch_call(gen), gen.layout_bank.condition_rows(cond, seeds=[(50, 2), (60, 1)]),
                             gen.cfg.z_dim, seeds=seeds)
    assert np.abs(moved - ref).max() > 1e-3
    del gen.layout_bank
    with pytest.raises(UserError, match="placement prior"):
        gan_latents(gen, cond)


def test_adversarial_grows_a_plain_student_into_a_layout_one_and_ships_it(tiny_data, layout_export, tmp_path, capsys):
    """python.adversarial with a layout LDM as teacher: a plain one-step student given as --init gets the layout input
    (zero at first), trains against the teacher reading the real latents' own places, and ships with the teacher's
    prior; the matching-aware term, which edits label sets alone, is refused."""
    from dataclasses import replace

    from python.adversarial import main as adversarial
    from python.models.generators import load_generator, reads_layout, save_generator
    from python.models.one_step import OneStep
    from python.models.sampling import gan_latents

    root, _ = layout_export
    teacher, tcfg = load_denoiser(root / "ldm")
    plain = OneStep(replace(teacher.cfg, layout=False), tcfg["schedule"])
    plain.denoiser.load_state_dict(teacher.state_dict(), strict=False)  # everything but the layout input
    save_generator(plain, tmp_path / "plain", {"vae_sha": tcfg["vae_sha"]})
    args = ["--preset", "tiny", "--data", str(tiny_data), "--ldm", str(root / "ldm"), "--vae", str(root / "vae"),
            "--judge", str(root / "judge" / "checkpoint.pth"), "--dmd-weight", "1", "--init", str(tmp_path / "plain")]
    with pytest.raises(SystemExit):
        adversarial(args + ["--run-dir", str(tmp_path / "refused")])  # the tiny preset's --mismatch 1
    assert "give --mismatch 0 with a layout teacher" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    run = tmp_path / "run"
    adversarial(args + ["--run-dir", str(run), "--mismatch", "0"])
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "shipped")])
    gen, cfg = load_generator(tmp_path / "shipped")
    assert reads_layout(gen) and cfg["objective"] == "adversarial+dmd" and cfg["trained_steps"] == 6
    assert all(np.array_equal(gen.layout_bank.slots[n], teacher.layout_bank.slots[n]) for n in teacher.layout_bank.slots)
    assert gen.denoiser.layout_in.weight.abs().sum() > 0  # zero in the init; the places now reach the image
    cond = np.zeros((2, NUM_CLASSES), np.float32)
    cond[:, [9, 22]] = 1
    lat = gan_latents(gen, cond, seed=1)
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()


def test_distill_pairs_of_a_layout_teacher_keep_the_places_and_train_a_layout_student(tiny_data, tiny_weights,
                                                                                      layout_export, tmp_path, capsys):
    """python.distill with a layout LDM: each pair's condition row holds the places the teacher was asked for (drawn
    from its prior with the shard's seed), x_0 is the teacher's sample at those places, and the student trained on
    them reads the places and ships with the teacher's prior; pairs of another kind of teacher are refused."""
    from python import distill
    from python.core.best_of import candidate_seed
    from python.core.diffusion import DEFAULT_APG_NORM, DEFAULT_GUIDANCE
    from python.core.noise import initial_noise
    from python.models.generators import load_generator, reads_layout

    root, _ = layout_export
    teacher, tcfg = load_denoiser(root / "ldm")
    pairs = tmp_path / "pairs"
    distill.main(["pairs", "--data", str(tiny_data), "--out", str(pairs), "--ldm", str(root / "ldm"), "--steps", "2",
                  "--count", "6", "--shard", "3", "--best-of", "2", "--classifier", str(root / "classifier"),
                  "--vae", str(root / "vae")])
    meta, got = distill.load_pairs(pairs)
    assert meta["layout"] is True and got["cond"].shape == (6, NUM_CLASSES + LAYOUT_DIM)
    cond = got["cond"].numpy()
    labels = cond[:, :NUM_CLASSES]
    assert np.array_equal(cond[:, NUM_CLASSES:].reshape(6, NUM_CLASSES, 3)[..., 2] > 0, labels > 0.5)
    # shard 1's rows are the prior's draw for that shard's seed, and x_0 the teacher's sample at those places
    assert np.array_equal(cond[3:], teacher.layout_bank.condition_rows(labels[3:], seed=1))
    with np.load(pairs / "pairs-00001.npz") as shard:
        x_T = shard["x_T"].astype(np.float32)
    checked = 0
    for k in range(2):  # the kept noise is one of the two candidates'
        ref = ldm_latents(teacher, Schedule(**tcfg["schedule"]), torch.from_numpy(cond[3:]), "dpmpp", 2,
                          DEFAULT_GUIDANCE, seed=candidate_seed(1, k), apg_norm=DEFAULT_APG_NORM).numpy()
        noise = initial_noise(candidate_seed(1, k), 3, (4, 16, 16))
        for i in np.flatnonzero(np.abs(x_T - noise).max((1, 2, 3)) < 2e-3):
            np.testing.assert_allclose(got["x_0"][3 + i].numpy(), ref[i], atol=5e-3, rtol=2e-3)
            checked += 1
    assert checked == 3  # every row's noise is one candidate's
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--pairs", str(pairs), "--vae", str(root / "vae"),
            "--judge", str(root / "judge" / "judge.safetensors"), "--batch", "4", "--lr", "1e-3", "--eval-every", "2",
            "--eval-conditions", "4", "--steps", "2", "--adv-weight", "0.5", "--cls-weight", "1",
            "--cls-classifier", str(root / "classifier")]
    distill.main(args + ["--run-dir", str(run)])
    ship(["gan", "--run", str(run), "--out", str(tmp_path / "shipped")])
    gen, cfg = load_generator(tmp_path / "shipped")
    assert reads_layout(gen) and cfg["trained_steps"] == 2
    assert all(np.array_equal(gen.layout_bank.slots[n], teacher.layout_bank.slots[n]) for n in teacher.layout_bank.slots)
    # the same pairs when their teacher is gone and --ldm names a plain one: refused before a run folder is made
    moved = shutil.copytree(pairs, tmp_path / "moved")
    (moved / "pairs.json").write_text(json.dumps({**meta, "ldm": str(tmp_path / "gone")}))
    with pytest.raises(SystemExit):
        distill.main([str(moved) if a == str(pairs) else a for a in args]
                     + ["--run-dir", str(tmp_path / "refused"), "--ldm", str(tiny_weights / "ldm")])
    assert "made with a layout teacher" in capsys.readouterr().err and not (tmp_path / "refused").exists()
