"""Object layouts: where each requested object sits in the image, as a condition the denoiser can read.

The LDM's commonest error is an object nobody asked for: a requested colour drawn twice or three times
(weights/ldm/MODEL_CARD.md, "What the extra objects are"). A label set says what to draw but not how many regions
to fill, and a 3M-parameter denoiser has to learn the count from 18,009 images. A layout says it outright: one blob
per requested object, at the place the object is to stand, the way layout-to-image models (GLIGEN, LayoutDiffusion,
LLM-grounded diffusion) split "what and where" from "how it looks".

The layout of an image is a latent variable of the scene, not a user's input: at sampling time it is drawn from
the renderer's own placement prior (`sample_scene`: objects in view, apart, each mostly unoccluded), kept with the
weights as a bank of scenes (`make_bank`; drawn from by python.core.layout, which the runtime shares), so the
condition the user gives is still the label set alone. For the training images of the
synthetic data set the layout is recovered exactly: every scene is drawn from np.random.default_rng([seed, TRAIN,
scene]) and re-drawing it costs no rendering beyond the placement's occlusion test.

Encoding (python.core.layout): per class, (u, v, r): the centre of the object's projected bounding box in [0, 1]
image coordinates (u right, v down, the 64x64 image's frame, which to64 stretches from the 4:3 render) and r, the
geometric mean of the box's half-extents in the same units. A condition row is the 24-dim multi-hot followed by
the 24 x 3 layout (python.models.denoiser, DenoiserConfig.layout): the samplers' unconditional pass zeroes the
whole row, which is exactly "no objects, no layout".
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from python.core.errors import UserError
from python.core.labels import NUM_CLASSES, OBJECTS, SHAPES
from python.core.layout import LAYOUT_DIM, PER_CLASS, LayoutBank
from python.data.dataset import cache_dir
from python.data.render import Obj, Scene, box_corners_px, sample_scene
from python.data.synthetic import LAYOUTS, RESOLUTION, TRAIN, pool_map, random_classes, scene_rng


def object_box(scene: Scene, o: Obj, width: int = RESOLUTION[0], height: int = RESOLUTION[1]) -> tuple:
    """(u, v, r) of object `o` in `scene`'s camera: its projected bounding box's centre and the geometric mean of the
    box's half-extents, in [0, 1] image units."""
    px = box_corners_px(scene, o, width, height)
    lo, hi = px.min(0), px.max(0)
    return ((lo[0] + hi[0]) / 2 / width, (lo[1] + hi[1]) / 2 / height,
            np.sqrt((hi[0] - lo[0]) / 2 / width * (hi[1] - lo[1]) / 2 / height))


def scene_layout(scene: Scene, upto: int | None = None, width: int = RESOLUTION[0],
                 height: int = RESOLUTION[1]) -> np.ndarray:
    """(24 * 3,) float32: (u, v, r) of each of the scene's first `upto` objects at its class's slot, zero elsewhere."""
    out = np.zeros((NUM_CLASSES, PER_CLASS), np.float32)
    for o in scene.objects[:upto]:
        out[OBJECTS[o.label]] = object_box(scene, o, width, height)
    return out.reshape(-1)


def mirror(layouts: np.ndarray) -> np.ndarray:
    """The layouts of the horizontally mirrored images (the latent cache keeps each image and its mirror image)."""
    m = np.array(layouts, np.float32).reshape(len(layouts), NUM_CLASSES, PER_CLASS)
    present = m[..., 2] > 0
    m[..., 0] = np.where(present, 1.0 - m[..., 0], 0.0)
    return m.reshape(len(layouts), -1)


def train_layouts(data: Path, names: list[str], labels: np.ndarray) -> np.ndarray:
    """(N, 72) layouts of the training images `names` (CLEVR_train_{scene:06d}_{k}.png) of a data folder written by
    python.make_data, re-drawn from its stats.json seed and checked against their multi-hot `labels`. Cached in the
    data's cache folder (python.data.dataset.cache_dir) beside the latent cache."""
    data = Path(data)
    stats_path = data / "stats.json"
    if not stats_path.exists():
        raise UserError(f"{data}: no stats.json; layouts can be recovered only for a data folder written by "
                        "python.make_data (the official i-CLEVR data does not record where its objects stand)")
    stats = json.loads(stats_path.read_text())
    seed, (width, height) = int(stats["seed"]), stats["resolution"]
    cache = cache_dir(data) / "layouts-train.npz"
    if cache.exists():
        d = np.load(cache)
        if list(d["names"]) == list(names):
            return d["layouts"]
    per_scene = int(max(stats["train"]["objects_per_image"], key=int))
    scenes: dict[int, Scene] = {}
    out = np.zeros((len(names), LAYOUT_DIM), np.float32)
    for i, name in enumerate(names):
        try:
            scene_idx, k = (int(p) for p in Path(name).stem.split("_")[2:4])
        except ValueError:
            raise UserError(f"{data}: {name} is not a CLEVR_train_SCENE_K.png name of python.make_data") from None
        if scene_idx not in scenes:
            rng = scene_rng(seed, TRAIN, scene_idx)
            scenes[scene_idx] = sample_scene(rng, random_classes(rng, per_scene), width, height)
        out[i] = scene_layout(scenes[scene_idx], k + 1, width, height)
    present = out.reshape(len(names), NUM_CLASSES, PER_CLASS)[..., 2] > 0
    if not np.array_equal(present, np.asarray(labels) > 0.5):
        bad = int(np.flatnonzero((present != (np.asarray(labels) > 0.5)).any(1))[0])
        raise UserError(f"{data}: the re-drawn scene of {names[bad]} does not hold its labels; the folder was not "
                        f"written by this renderer with seed {seed}")
    tmp = cache.with_name(".layouts-train.tmp.npz")
    np.savez(tmp, names=np.array(names), layouts=out)
    tmp.replace(cache)
    return out


def _bank_scenes(args):
    seed, n, start, count, width, height = args
    out = np.zeros((count, n, len(SHAPES), PER_CLASS), np.float32)
    for j in range(count):
        rng = scene_rng(seed, LAYOUTS, n * 10_000_000 + start + j)
        sc = sample_scene(rng, random_classes(rng, n), width, height)
        out[j] = [[object_box(sc, replace(o, shape=k), width, height) for k in range(len(SHAPES))] for o in sc.objects]
    return out


def make_bank(per_count: int = 4096, max_objects: int = 5, seed: int = 0, workers: int | None = None,
              width: int = RESOLUTION[0], height: int = RESOLUTION[1]) -> LayoutBank:
    """The placement prior a layout model samples from (python.core.layout.LayoutBank): `per_count` scenes of each
    count 1..max_objects, drawn by the renderer's scene sampler from the LAYOUTS stream of `seed`."""
    if per_count < 1 or not 1 <= max_objects <= NUM_CLASSES:
        raise UserError(f"a layout bank needs >= 1 scene per count and 1..{NUM_CLASSES} objects, got {per_count} and "
                        f"{max_objects}")
    chunk = 256
    tasks = [(seed, n, a, min(chunk, per_count - a), width, height) for n in range(1, max_objects + 1)
             for a in range(0, per_count, chunk)]
    parts = pool_map(_bank_scenes, tasks, workers or os.cpu_count() or 1, "layout bank")
    return LayoutBank({n: np.concatenate([p for t, p in zip(tasks, parts) if t[1] == n])
                       for n in range(1, max_objects + 1)})
