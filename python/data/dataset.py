"""The i-CLEVR dataset in its official format, cached as one uint8 array.

A root holds `objects.json`, `train.json` (file name -> label list), `test.json` and `new_test.json`
(lists of label lists) and the PNGs, either in `root/iclevr/` (as the course's iclevr.zip unpacks)
or in the root itself. Images are converted to RGB and resized to 64x64 without cropping, exactly
as the course's loader does (PIL bilinear), then kept as uint8; `to_model_range` applies
ToTensor + Normalize((0.5,)*3, (0.5,)*3), i.e. maps to [-1, 1].

Decoding 18k PNGs takes a while on 2 cores, so the decoded array is cached in a .npy file keyed by
the image files' names, sizes and modification times: any change to the source rebuilds it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from python.core.errors import UserError
from python.core.labels import OBJECTS, encode, load_conditions, load_objects, read_json

IMAGE_SIZE = 64


def to64(img: Image.Image) -> np.ndarray:
    """Any PIL image (RGBA, RGB, L, any size) -> (64, 64, 3) uint8, the course's preprocessing."""
    return np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.uint8)


def load_image64(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return to64(img)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def to_model_range(images_u8):
    """(N, 64, 64, 3) uint8 (numpy or torch) -> (N, 3, 64, 64) float32 torch tensor in [-1, 1]."""
    import torch

    x = images_u8 if isinstance(images_u8, torch.Tensor) else torch.from_numpy(np.array(images_u8, np.uint8))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def image_dir(root: Path) -> Path:
    root = Path(root)
    return root / "iclevr" if (root / "iclevr").is_dir() else root


def read_labelled(json_path: Path, objects: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """A train.json-style file (file name -> label list) -> (file names, (N, C) multi-hot)."""
    entries = read_json(json_path)
    if not isinstance(entries, dict) or not entries:
        raise UserError(f"{json_path}: expected a non-empty JSON object mapping image file names to label lists")
    names = list(entries)
    labels = np.stack([encode(entries[n], objects, f"{json_path}: {n}") for n in names])
    return names, labels


def _cache_key(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UserError(f"{p}: image not found (listed in the labels file)") from None
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_dir(root: Path) -> Path:
    d = Path(root) / ".cache"
    try:
        d.mkdir(exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path.home() / ".cache" / "iclevr-gen" / hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_images_cached(paths: list[Path], cache_dir: Path, tag: str, progress: bool = True) -> np.ndarray:
    """Decode images to (N, 64, 64, 3) uint8 once; later calls read the .npy cache."""
    key = _cache_key(paths)
    cache = Path(cache_dir) / f"{tag}-{key}.npy"
    if cache.exists():
        return np.load(cache, mmap_mode="r")
    from tqdm import tqdm

    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc=f"decoding {tag} images", disable=not progress, unit="img")):
        out[i] = load_image64(p)
    for old in Path(cache_dir).glob(f"{tag}-*.npy"):
        old.unlink()
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, cache)
    return out


@dataclass
class LabelledImages:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: np.ndarray  # (N, C) float32 multi-hot
    names: list[str]

    def __len__(self):
        return len(self.names)


def load_split(root: Path, labels_file: str = "train.json", images: Path | None = None,
               progress: bool = True) -> LabelledImages:
    """Images and multi-hot labels for a train.json-style file under root (the official format)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found (make one with `python -m python.make_data --out {root}`)")
    objects = load_objects(root / "objects.json") if (root / "objects.json").exists() else OBJECTS
    names, labels = read_labelled(root / labels_file, objects)
    folder = Path(images) if images else image_dir(root)
    paths = [folder / n for n in names]
    tag = Path(labels_file).stem
    arr = load_images_cached(paths, cache_dir(root), tag, progress)
    return LabelledImages(np.asarray(arr), labels, names)


def heldout_or_train(root: Path, train: LabelledImages) -> LabelledImages:
    """The labelled held-out renders of a dataset folder for evaluation, or the training split if it has none."""
    root = Path(root)
    if (root / "heldout_renders.json").exists():
        return load_split(root, "heldout_renders.json", images=root / "heldout_renders")
    return train


def load_condition_file(root_or_file: Path, name: str | None = None) -> np.ndarray:
    """Multi-hot conditions of test.json / new_test.json / heldout.json, in file order."""
    path = Path(root_or_file) / name if name else Path(root_or_file)
    objects_path = path.parent / "objects.json"
    objects = load_objects(objects_path) if objects_path.exists() else OBJECTS
    return load_conditions(path, objects)


def training_label_sets(data: Path) -> np.ndarray:
    """The distinct label sets of the dataset's train.json (the teacher is asked for what it was trained on)."""
    data = Path(data)
    if not (data / "train.json").exists():
        raise UserError(f"{data}: no train.json (make a dataset with `python -m python.make_data --out {data}`)")
    objects = load_objects(data / "objects.json") if (data / "objects.json").exists() else OBJECTS
    return np.unique(read_labelled(data / "train.json", objects)[1].astype(np.float32), axis=0)
