"""Weights folders, the one format every network ships in: config.json (what to build, and provenance) beside one
safetensors file. Written atomically; read with errors that name the file and say what is wrong with it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from python.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "weights"


def save_weights(folder: Path, model: torch.nn.Module, filename: str, config: dict, half: bool = False) -> None:
    """`filename` (safetensors; floating tensors as fp16 with half) and config.json, each written to a temporary
    file and swapped in, so a reader never sees half of either."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{filename}.tmp"
    save_file({k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / filename)
    tmp = folder / ".config.tmp"
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, folder / "config.json")


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


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict in float32 (shipped weights are fp16)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file, corrupt or truncated ({e})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_state_into(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """model with the weights of `path`, which must match it exactly."""
    try:
        model.load_state_dict(read_state(path))
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    return model
