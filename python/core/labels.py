"""The 24 i-CLEVR classes and the one place where label sets become multi-hot vectors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES = ("cube", "sphere", "cylinder")
# The official objects.json: shape-major, colours in the order above ("gray cube": 0 ... "yellow cylinder": 23).
OBJECTS = {f"{c} {s}": i for i, (s, c) in enumerate((s, c) for s in SHAPES for c in COLORS)}
NUM_CLASSES = len(OBJECTS)
CLASS_NAMES = tuple(OBJECTS)  # index -> name


def read_json(path: Path):
    """Parse a JSON file; a missing or malformed file is a UserError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); JSON files are UTF-8") from None
    except RecursionError:
        raise UserError(f"{path}: malformed JSON (nested too deeply)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _show(value, limit: int = 120) -> str:
    """repr(value), cut short: an error message quotes what it was given, never megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def load_objects(path: Path) -> dict[str, int]:
    """Read an objects.json and check that it maps names to exactly 0..N-1."""
    mapping = read_json(path)
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{path}: expected a non-empty JSON object mapping names to 0..N-1")
    values = sorted(mapping.values()) if all(isinstance(v, int) for v in mapping.values()) else None
    if values != list(range(len(mapping))) or not all(isinstance(k, str) for k in mapping):
        raise UserError(f"{path}: objects.json must map each name to a distinct integer 0..{len(mapping) - 1}")
    return dict(mapping)


def encode(label_set, objects: dict[str, int] = OBJECTS, where: str = "labels", max_objects: int | None = None) -> np.ndarray:
    """One label set (list of names) -> multi-hot float32 vector, with a clear error for bad sets."""
    if not isinstance(label_set, (list, tuple)) or not all(isinstance(n, str) for n in label_set):
        raise UserError(f"{where}: expected a list of object names, got {_show(label_set)}")
    if not label_set:
        raise UserError(f"{where}: empty label list (at least one object is required)")
    if max_objects is not None and len(label_set) > max_objects:
        raise UserError(f"{where}: {len(label_set)} objects, at most {max_objects} allowed")
    vec = np.zeros(len(objects), np.float32)
    for name in label_set:
        if name not in objects:
            raise UserError(f"{where}: unknown label {_show(name)}; valid names are: {', '.join(objects)}")
        if vec[objects[name]]:
            raise UserError(f"{where}: label {_show(name)} repeated (an object appears at most once per image)")
        vec[objects[name]] = 1.0
    return vec


def encode_many(label_sets, objects: dict[str, int] = OBJECTS, where: str = "labels") -> np.ndarray:
    """A list of label sets -> (N, C) multi-hot float32."""
    if not isinstance(label_sets, list) or not label_sets:
        raise UserError(f"{where}: expected a non-empty JSON list of label lists")
    return np.stack([encode(s, objects, f"{where}[{i}]") for i, s in enumerate(label_sets)])


def decode(vec, objects: dict[str, int] = OBJECTS) -> list[str]:
    """Multi-hot vector -> list of names in class order."""
    names = {i: n for n, i in objects.items()}
    return [names[i] for i in np.flatnonzero(np.asarray(vec) > 0.5)]


def load_conditions(path: Path, objects: dict[str, int] = OBJECTS) -> np.ndarray:
    """A test.json-style file (list of label lists) -> (N, C) multi-hot, in file order."""
    return encode_many(read_json(path), objects, where=str(path))


def parse_label_arg(text: str, objects: dict[str, int] = OBJECTS) -> np.ndarray:
    """'red sphere,yellow cube' (a CLI argument) -> multi-hot vector."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return encode(names, objects, where="--labels")
