"""The synthetic i-CLEVR dataset: scenes drawn per stream, rendered (python/data/render.py), written in the
official format (make_dataset), or rendered straight to arrays for the judges (render_labelled_arrays) and the
evaluation's reference renders (render_conditions).

Every scene is drawn from its own stream np.random.default_rng([seed, stream, index]), so the output
is the same bytes whatever the number of workers.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from python.core.errors import UserError
from python.core.labels import CLASS_NAMES, NUM_CLASSES, OBJECTS
from python.data.dataset import to64
from python.data.render import render, sample_scene

# random streams (REFERENCE: evaluation's renders; COUNTS: the object counter's scenes, duplicates allowed;
# FAINT: scenes with one half-transparent object, for a classifier that calls a ghost absent; LAYOUTS: the placement
# prior of a layout model, python/data/layout.py)
TRAIN, CONDITIONS, HELDOUT, JUDGE, REFERENCE, COUNTS, FAINT, LAYOUTS = 0, 1, 2, 3, 4, 5, 6, 7
RESOLUTION = (160, 120)  # 4:3 like CLEVR's 320x240, at a quarter of the pixels


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def random_classes(rng: np.random.Generator, n: int) -> list[int]:
    return [int(c) for c in rng.choice(NUM_CLASSES, n, replace=False)]


def render_train_scene(args):
    seed, scene, out_dir, size, objects_per_scene = args
    rng = scene_rng(seed, TRAIN, scene)
    sc = sample_scene(rng, random_classes(rng, objects_per_scene), *size)
    entries = {}
    for k in range(objects_per_scene):
        name = f"CLEVR_train_{scene:06d}_{k}.png"
        Image.fromarray(render(sc, *size, upto=k + 1)).save(out_dir / name, compress_level=6)
        entries[name] = sc.labels[: k + 1]
    return entries


def _render_heldout(args):
    seed, index, out_dir, size, lo, hi = args
    rng = scene_rng(seed, HELDOUT, index)
    sc = sample_scene(rng, random_classes(rng, int(rng.integers(lo, hi + 1))), *size)
    name = f"CLEVR_heldout_{index:06d}.png"
    Image.fromarray(render(sc, *size)).save(out_dir / name, compress_level=6)
    return {name: sc.labels}


def _render_array(args):
    seed, stream, index, size, lo, hi = args
    rng = scene_rng(seed, stream, index)
    classes = random_classes(rng, int(rng.integers(lo, hi + 1)))
    sc = sample_scene(rng, classes, *size)
    label = np.zeros(NUM_CLASSES, np.float32)
    label[classes] = 1
    return to64(Image.fromarray(render(sc, *size))), label


def pool_map(fn, tasks, workers: int, desc: str):
    from tqdm import tqdm

    out = []
    if workers <= 1:
        for t in tqdm(tasks, desc=desc, unit="scene"):
            out.append(fn(t))
        return out
    with mp.get_context("fork").Pool(workers) as pool:
        for r in tqdm(pool.imap(fn, tasks, chunksize=8), total=len(tasks), desc=desc, unit="scene"):
            out.append(r)
    return out


def render_labelled_arrays(seed: int, n: int, lo: int = 1, hi: int = 5, stream: int = JUDGE,
                           workers: int | None = None, size=RESOLUTION):
    """n freshly rendered 64x64 uint8 images with 1..5 objects and their multi-hot labels (no PNGs):
    the judge's training data. Same preprocessing as the loader (render 4:3, PIL-resize to 64x64)."""
    tasks = [(seed, stream, i, size, lo, hi) for i in range(n)]
    res = pool_map(_render_array, tasks, workers or os.cpu_count(), f"rendering {n} images")
    return np.stack([r[0] for r in res]), np.stack([r[1] for r in res])


def count_classes(rng: np.random.Generator, n: int, repeat: float) -> list[int]:
    """n class indices; each after the first repeats an earlier one with probability `repeat` (two red cubes),
    else is drawn uniformly (which may repeat too)."""
    classes: list[int] = []
    for _ in range(n):
        repeated = classes and rng.random() < repeat
        classes.append(int(rng.choice(classes)) if repeated else int(rng.integers(NUM_CLASSES)))
    return classes


def _render_counted(args):
    seed, index, size, lo, hi, repeat = args
    rng = scene_rng(seed, COUNTS, index)
    classes = count_classes(rng, int(rng.integers(lo, hi + 1)), repeat)
    try:
        sc = sample_scene(rng, classes, *size)
    except RuntimeError:  # no room for these objects in this frame: the scene is skipped
        return None
    return to64(Image.fromarray(render(sc, *size))), np.bincount(classes, minlength=NUM_CLASSES)


def render_count_arrays(seed: int, n: int, lo: int = 1, hi: int = 5, repeat: float = 0.3,
                        workers: int | None = None, size=RESOLUTION):
    """Up to n fresh 64x64 uint8 renders of lo..hi objects, a class allowed more than once, and the number of
    objects of each class (N, 24) int64: the object counter's training data (python/models/classifier.py). The
    official label sets never repeat a class; a counter must see repeats to tell one red cube from two."""
    if not 1 <= lo <= hi:
        raise UserError(f"object counts must satisfy 1 <= lo <= hi, got {lo}..{hi}")
    tasks = [(seed, i, size, lo, hi, repeat) for i in range(n)]
    res = [r for r in pool_map(_render_counted, tasks, workers or os.cpu_count(), f"rendering {n} scenes") if r]
    return np.stack([r[0] for r in res]), np.stack([r[1] for r in res]).astype(np.int64)


def _render_faint(args):
    seed, index, size, lo, hi, alpha = args
    rng = scene_rng(seed, FAINT, index)
    classes = random_classes(rng, int(rng.integers(lo, hi + 1)) + 1)  # the last one is drawn faint
    a = float(rng.uniform(*alpha))
    try:
        sc = sample_scene(rng, classes, *size)
    except RuntimeError:
        return None
    solid = render(sc, *size, upto=len(classes) - 1).astype(np.float32)
    ghost = render(sc, *size).astype(np.float32)
    img = Image.fromarray(np.clip((1 - a) * solid + a * ghost + 0.5, 0, 255).astype(np.uint8))
    label, faint = np.zeros(NUM_CLASSES, np.float32), np.zeros(NUM_CLASSES, np.float32)
    label[classes[:-1]], faint[classes[-1]] = 1, 1
    return to64(img), label, faint, a


def render_faint_arrays(seed: int, n: int, lo: int = 0, hi: int = 3, alpha=(0.1, 0.5), workers: int | None = None,
                        size=RESOLUTION):
    """Up to n fresh 64x64 uint8 renders of lo..hi solid objects plus one more drawn half-transparent (the scene
    rendered with and without it, blended at an opacity drawn from `alpha`, its shadow fading with it), as
    (images, solid multi-hot, faint multi-hot, opacities). No class repeats. For a classifier that is to call a
    ghost absent (a class term that a faint object does not satisfy): the official data never holds one."""
    if not 0 <= lo <= hi or hi > 4:
        raise UserError(f"solid object counts must satisfy 0 <= lo <= hi <= 4, got {lo}..{hi}")
    if not 0 < alpha[0] <= alpha[1] < 1:
        raise UserError(f"opacities must satisfy 0 < low <= high < 1, got {alpha[0]}..{alpha[1]}")
    tasks = [(seed, i, size, lo, hi, tuple(alpha)) for i in range(n)]
    res = [r for r in pool_map(_render_faint, tasks, workers or os.cpu_count(), f"rendering {n} faint scenes") if r]
    return (np.stack([r[0] for r in res]), np.stack([r[1] for r in res]), np.stack([r[2] for r in res]),
            np.array([r[3] for r in res], np.float32))


def render_conditions(cond: np.ndarray, per: int, seed: int = 0, stream: int = REFERENCE,
                      size=RESOLUTION) -> np.ndarray:
    """`per` fresh renders of each condition (rows of a multi-hot array, in order) as (N * per, 64, 64, 3) uint8:
    the real images that generated ones are compared with."""
    out = []
    for i, c in enumerate(cond):
        classes = [int(j) for j in np.flatnonzero(c)]
        for k in range(per):
            sc = sample_scene(scene_rng(seed, stream, i * per + k), classes, *size)
            out.append(to64(Image.fromarray(render(sc, *size))))
    return np.stack(out)


def make_conditions(rng: np.random.Generator, n: int, sizes=(1, 2, 3), avoid: set | None = None,
                    absent_fraction: float = 0.0) -> list[list[str]]:
    """n label sets with a uniform number of objects from `sizes`; of the 3-object ones, a fraction
    is drawn from combinations absent from `avoid` (the training label sets)."""
    out = []
    unseen = [c for c in combinations(range(NUM_CLASSES), 3)
              if frozenset(CLASS_NAMES[i] for i in c) not in (avoid or set())]
    for _ in range(n):
        k = int(rng.choice(sizes))
        if k == 3 and unseen and rng.random() < absent_fraction:
            classes = list(unseen[int(rng.integers(len(unseen)))])
            rng.shuffle(classes)
        else:
            classes = random_classes(rng, k)
        out.append([CLASS_NAMES[c] for c in classes])
    return out


def contact_sheet(images: list[np.ndarray], captions: list[list[str]], cols: int = 8) -> Image.Image:
    """A grid of thumbnails (as rendered, downsized to 160 wide) with their labels underneath."""
    tw, th, cap = 160, 120, 36
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tw, rows * (th + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, labels) in enumerate(zip(images, captions)):
        x, y = (i % cols) * tw, (i // cols) * (th + cap)
        sheet.paste(Image.fromarray(img).convert("RGB").resize((tw, th), Image.BILINEAR), (x, y))
        for j, text in enumerate(labels[:3]):
            draw.text((x + 3, y + th + 1 + 11 * j), text, fill=(0, 0, 0))
    return sheet


def label_stats(label_sets: list[list[str]]) -> dict:
    per_image = Counter(len(s) for s in label_sets)
    per_class = Counter(n for s in label_sets for n in s)
    return {"images": len(label_sets),
            "objects_per_image": {str(k): per_image[k] for k in sorted(per_image)},
            "class_counts": {n: per_class.get(n, 0) for n in OBJECTS}}


def _write_json(path: Path, obj, indent=None):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def make_dataset(out: Path, scenes: int = 6003, seed: int = 0, heldout_images: int = 2000,
                 heldout_conditions: int = 1024, workers: int | None = None, size=RESOLUTION,
                 objects_per_scene: int = 3) -> dict:
    out = Path(out)
    try:
        (out / "iclevr").mkdir(parents=True, exist_ok=True)
        (out / "heldout_renders").mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror})") from None
    workers = workers or os.cpu_count()
    t0 = time.time()
    parts = pool_map(render_train_scene,
                      [(seed, s, out / "iclevr", size, objects_per_scene) for s in range(scenes)], workers, "train scenes")
    train = {k: v for p in parts for k, v in p.items()}
    t_train = time.time() - t0
    parts = pool_map(_render_heldout, [(seed, i, out / "heldout_renders", size, 1, 5) for i in range(heldout_images)],
                      workers, "held-out renders")
    heldout_renders = {k: v for p in parts for k, v in p.items()}

    crng = scene_rng(seed, CONDITIONS, 0)
    seen = {frozenset(v) for v in train.values()}
    conditions = {
        "test.json": make_conditions(crng, 32),
        "new_test.json": make_conditions(crng, 32),
        "heldout.json": make_conditions(crng, heldout_conditions, avoid=seen, absent_fraction=0.5),
        "heldout_45.json": make_conditions(crng, max(heldout_conditions // 4, 32), sizes=(4, 5)),
    }
    _write_json(out / "objects.json", OBJECTS)
    _write_json(out / "train.json", train)
    _write_json(out / "heldout_renders.json", heldout_renders)
    for name, conds in conditions.items():
        _write_json(out / name, conds)

    first = list(train)[:64]
    sheet = contact_sheet([np.asarray(Image.open(out / "iclevr" / n)) for n in first], [train[n] for n in first])
    sheet.save(out / "contact_sheet.png")
    held = conditions["heldout.json"]
    stats = {
        "seed": seed, "scenes": scenes, "resolution": list(size), "workers": workers,
        "train_seconds": round(t_train, 1), "train_images_per_sec": round(len(train) / t_train, 1),
        "train": label_stats(list(train.values())),
        "heldout_renders": label_stats(list(heldout_renders.values())),
        "heldout_conditions_absent_from_train": sum(frozenset(c) not in seen for c in held),
        "heldout_conditions": len(held),
    }
    _write_json(out / "stats.json", stats, indent=1)
    return stats


