"""Object layouts as a sampler draws them: the layout model's condition rows, in numpy (the runtime needs no torch).

A layout model (python.models.denoiser, DenoiserConfig.layout) reads, beside the multi-hot label set, where each
requested object stands: per class (u, v, r), the centre of the object's box in [0, 1] image coordinates and its
size (python/data/layout.py, which recovers them for the training renders). At sampling time the places are a latent
variable drawn from the placement prior of the scenes, which the user never gives. The prior travels with the
weights as a bank (layouts.npz): for each object count n, K scenes of n objects drawn by the renderer's own scene
sampler, each object's (u, v, r) kept for each of the three shapes it could have (a cube is lower than a sphere of the
same size, so its box is too). Drawing a layout for a label set of n objects: one of the K scenes of n objects, its
objects given to the requested classes in a random order, each taking the box of its own shape. Row i of a call
draws from np.random.default_rng([seed, i]), so the places do not depend on the batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .labels import NUM_CLASSES, SHAPES
from .sampling import seed_parts

PER_CLASS = 3  # u, v, r
LAYOUT_DIM = NUM_CLASSES * PER_CLASS
BANK_FILE = "layouts.npz"
GENERATOR_BANK_FILE = "generator_layouts.npz"  # an export's second prior, a layout GAN-path generator's
SHAPE_OF = np.arange(NUM_CLASSES) // (NUM_CLASSES // len(SHAPES))  # the official order is shape-major


class LayoutBank:
    """Scenes of 1..max_objects objects: slots[n] is (K, n, 3 shapes, 3) float32 (u, v, r)."""

    def __init__(self, slots: dict[int, np.ndarray]):
        for n, arr in slots.items():
            if arr.ndim != 4 or arr.shape[1:] != (n, len(SHAPES), PER_CLASS) or not len(arr):
                raise UserError(f"layout bank: scenes of {n} objects must be (K >= 1, {n}, {len(SHAPES)}, {PER_CLASS}),"
                                f" got {arr.shape}")
        self.slots = {int(n): np.asarray(a, np.float32) for n, a in slots.items()}

    @property
    def max_objects(self) -> int:
        return max(self.slots)

    def save(self, folder: Path, name: str = BANK_FILE) -> Path:
        path = Path(folder) / name
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{f"n{n}": a.astype(np.float16) for n, a in self.slots.items()})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path, name: str = BANK_FILE) -> "LayoutBank":
        path = Path(folder) / name
        try:
            with np.load(path) as d:
                return cls({int(k[1:]): d[k].astype(np.float32) for k in d.files})
        except FileNotFoundError:
            raise UserError(f"{path}: not found; a layout model's folder keeps its placement prior there "
                            "(python -m python.ship ldm writes it)") from None
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a layout bank ({e})") from None

    def draw(self, cond: np.ndarray, seed: int = 0) -> np.ndarray:
        """(N, 72) places for multi-hot conditions (N, 24); the empty set has none."""
        cond = np.asarray(cond)
        if cond.ndim != 2 or cond.shape[1] != NUM_CLASSES:
            raise UserError(f"conditions must be (N, {NUM_CLASSES}) multi-hot, got shape {cond.shape}")
        out = np.zeros((len(cond), NUM_CLASSES, PER_CLASS), np.float32)
        for i, row in enumerate(cond):
            classes = np.flatnonzero(row > 0.5)
            if not len(classes):
                continue
            scenes = self.slots.get(len(classes))
            if scenes is None:
                raise UserError(f"condition {i} asks for {len(classes)} objects; this layout model's placement prior "
                                f"holds scenes of {sorted(self.slots)} objects")
            rng = np.random.default_rng([seed, i])
            scene = scenes[rng.integers(len(scenes))]  # (n, 3 shapes, 3)
            slot = rng.permutation(len(classes))
            out[i, classes] = scene[slot, SHAPE_OF[classes]]
        return out.reshape(len(cond), LAYOUT_DIM)

    def condition_rows(self, cond: np.ndarray, seed: int = 0, seeds=None) -> np.ndarray:
        """Multi-hot (N, 24) -> the layout model's condition rows (N, 24 + 72): each seed's rows (`seeds`, as the
        samplers take them, python.core.sampling.seed_parts) draw their places from that seed. Rows that are already
        that wide pass as they are."""
        cond = np.asarray(cond, np.float32)
        if cond.ndim == 2 and cond.shape[1] == NUM_CLASSES + LAYOUT_DIM:
            return cond
        parts = seed_parts(len(cond), seed, seeds)
        ends = np.cumsum([0] + [count for _, count in parts])
        places = [self.draw(cond[a:b], s) for (s, _), a, b in zip(parts, ends[:-1], ends[1:])]
        return np.concatenate([cond, np.concatenate(places)], axis=1)
