"""Weights folders, the one format every network ships in: config.json (what to build, and provenance) beside one
safetensors file. Written atomically; read with errors that name the file and say what is wrong with it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from python.core.checksum import sha256
from python.core.errors import UserError
from python.core.folders import replace_folder

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "weights"


def save_weights(folder: Path, model: torch.nn.Module, filename: str, config: dict, half: bool = False,
                 also=None) -> None:
    """`filename` (safetensors; floating tensors as fp16 with half) and config.json (with the file's sha256, checked
    at load), and whatever also(staged_folder) writes beside them (None: nothing), written atomically as a folder: a
    copy of the folder (its other files, e.g. MODEL_CARD.md, kept) is
    staged beside it, the new files written and read back there, and the staged folder swapped in with renames. A
    crash or a full disk leaves the old folder whole, never new weights beside an old config."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = folder.parent / f".{folder.name}.saving-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if folder.is_dir():
            shutil.copytree(folder, stage)
        else:
            stage.mkdir()
        save_file({k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in model.state_dict().items()}, str(stage / filename))
        read_state(stage / filename)  # verify: what was written reads back
        if also is not None:
            also(stage)
        checksums = {**config.get("sha256", {}), filename: sha256(stage / filename)}
        (stage / "config.json").write_text(json.dumps({**config, "sha256": checksums}, indent=1))
        replace_folder(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_config(folder: Path, filename: str, what: str, how: str) -> dict:
    """config.json of a weights folder that must also hold `filename`; `what` names the network and `how` the
    command that trains one, for the error when the folder is not one."""
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / filename).exists():
        raise UserError(f"{folder}: no {what} here (expected config.json and {filename}; train one with `{how}`)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'config.json'}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{folder / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def lineage(folder: Path) -> dict | None:
    """Where a warm start began, for the provenance of what it trains: the folder, its files' sha256 and the
    provenance its config.json carries, its own `init_from` included, so that a chain of warm starts (the GAN path:
    a regression student, then one distribution-matching run after another) reads back to its first run from the
    shipped config alone, whatever the folders hold by then. None where the folder has no readable config.json (its
    loader says what is wrong)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    keep = ("sha256", "trained_steps", "run", "weights", "objective", "init_from")
    return {"path": str(Path(folder).resolve()), **{k: cfg[k] for k in keep if cfg.get(k) is not None}}


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict in float32 (shipped weights are fp16)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file, corrupt or truncated ({e})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_state_into(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """model with the weights of `path`, which must match it exactly (and its sha256, where the folder's config.json
    records one: a file replaced or damaged after it was saved is refused)."""
    path = Path(path)
    state = read_state(path)  # a truncated or corrupt file is named as such before any checksum is compared
    config = path.parent / "config.json"
    if config.exists():
        try:
            recorded = json.loads(config.read_text()).get("sha256", {}).get(path.name)
        except (ValueError, AttributeError):
            recorded = None  # read_config reports a malformed config.json to whoever reads it
        if recorded and sha256(path) != recorded:
            raise UserError(f"{path}: its checksum differs from {config}'s (damaged, or replaced without its "
                            f"config); restore the folder or save it again")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    return model
