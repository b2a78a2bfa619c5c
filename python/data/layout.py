"""Object layouts: where each requested object sits in the image, as a condition the denoiser can read.

The LDM's commonest error is an object nobody asked for: a requested colour drawn twice or three times
(weights/ldm/MODEL_CARD.md, "What the extra objects are"). A label set says what to draw but not how many regions
to fill, and a 3M-parameter denoiser has to learn the count from 18,009 images. A layout says it outright: one blob
per requested object, at the place the object is to stand, the way layout-to-image models (GLIGEN, LayoutDiffusion,
LLM-grounded diffusion) split "what and where" from "how it looks".

The layout of an image is a latent variable of the scene, not a user's input: at sampling time it is drawn from
the renderer's own placement prior (`sample_scene`: objects in view, apart, each mostly unoccluded) for the
requested classes, so the condition the user gives is still the label set alone. For the training images of the
synthetic data set the layout is recovered exactly: every scene is drawn from np.random.default_rng([seed, TRAIN,
scene]) and re-drawing it costs no rendering beyond the placement's occlusion test.

Encoding: per class, (u, v, r): the centre of the object's projected bounding box in [0, 1] image coordinates
(u right, v down, the 64x64 image's frame, which to64 stretches from the 4:3 render) and r, the geometric mean of
the box's half-extents in the same units. A condition row is the 24-dim multi-hot followed by the 24 x 3 layout
(python.models.denoiser, DenoiserConfig.layout): the samplers' unconditional pass zeroes the whole row, which is
exactly "no objects, no layout".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from python.core.errors import UserError
from python.core.labels import NUM_CLASSES, OBJECTS
from python.data.dataset import cache_dir
from python.data.render import Scene, project, sample_scene
from python.data.synthetic import RESOLUTION, TRAIN, random_classes, scene_rng

PER_CLASS = 3  # u, v, r
LAYOUT_DIM = NUM_CLASSES * PER_CLASS


def scene_layout(scene: Scene, upto: int | None = None, width: int = RESOLUTION[0],
                 height: int = RESOLUTION[1]) -> np.ndarray:
    """(24 * 3,) float32: (u, v, r) of each of the scene's first `upto` objects at its class's slot, zero elsewhere."""
    out = np.zeros((NUM_CLASSES, PER_CLASS), np.float32)
    for o in scene.objects[:upto]:
        r, h2 = o.footprint, 2 * o.half
        corners = [[o.x + sx * r, o.y + sy * r, z] for sx in (-1, 1) for sy in (-1, 1) for z in (0, h2)]
        px, _ = project(scene, corners, width, height)
        lo, hi = px.min(0), px.max(0)
        u, v = (lo[0] + hi[0]) / 2 / width, (lo[1] + hi[1]) / 2 / height
        rad = np.sqrt((hi[0] - lo[0]) / 2 / width * (hi[1] - lo[1]) / 2 / height)
        out[OBJECTS[o.label]] = (u, v, rad)
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


def sample_layouts(cond: np.ndarray, seed: int = 0, width: int = RESOLUTION[0], height: int = RESOLUTION[1]) -> np.ndarray:
    """(N, 72) layouts for multi-hot conditions (N, 24), drawn from the renderer's placement prior, row i from
    np.random.default_rng([seed, i]) (the same layouts whatever the batch)."""
    cond = np.asarray(cond)
    if cond.ndim != 2 or cond.shape[1] != NUM_CLASSES:
        raise UserError(f"conditions must be (N, {NUM_CLASSES}) multi-hot, got shape {cond.shape}")
    out = np.zeros((len(cond), LAYOUT_DIM), np.float32)
    for i, row in enumerate(cond):
        classes = [int(c) for c in np.flatnonzero(row > 0.5)]
        if classes:
            rng = np.random.default_rng([seed, i])
            classes = [classes[j] for j in rng.permutation(len(classes))]  # placement order is drawn, not sorted
            out[i] = scene_layout(sample_scene(rng, classes, width, height), None, width, height)
    return out


def with_layouts(cond: np.ndarray, seed: int = 0) -> np.ndarray:
    """Multi-hot (N, 24) -> the layout model's condition rows (N, 24 + 72)."""
    cond = np.asarray(cond, np.float32)
    return np.concatenate([cond, sample_layouts(cond, seed)], axis=1)
