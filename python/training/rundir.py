"""The run folder every training writes: config.json, log.txt, metrics.jsonl, samples/, checkpoints.

Checkpoints are crash-safe: each is written completely into its own `ckpt-<step>/` folder
(weights as safetensors, optimizer and RNG state as a torch file) and flushed to disk, then the one-line `latest`
file is swapped in atomically with os.replace, then checkpoints beyond the newest two are removed. An interrupted
write leaves the previous checkpoint as `latest`; a newest checkpoint that is damaged anyway (a disk that lied) is
skipped for the one before it, with a warning; `--resume` continues from what loads.

A resume refuses, before it writes anything, settings that would change what the run is (the trainer names them:
shapes, schedule, latent space, learning rate): a run is continued as it was begun, or begun anew in another folder.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from python.core.errors import UserError
from python.core.images import image_grid, rows_grid


class RunDir:
    def __init__(self, path: Path, config: dict, resume: bool = False, fixed: tuple = (), defaults: dict | None = None):
        """`fixed`: settings a resumed run must keep. `defaults` ({setting: {field: value}}): the value a field of a
        dict-valued setting had before the field existed; a run saved without it is compared as if it had it (a
        run folder from before an option was added resumes, unless the option is now set otherwise)."""
        self.path = Path(path)
        self.t0 = time.time()
        if self.path.exists() and (self.path / "latest").exists() and not resume:
            raise UserError(f"{self.path}: run folder already holds a checkpoint; pass --resume to continue it "
                            f"or choose another --run-dir folder")
        try:
            (self.path / "samples").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the run folder ({e.strerror})") from None
        if resume and (self.path / "config.json").exists():
            old = json.loads((self.path / "config.json").read_text())
            if old.get("init_from") is not None:  # what the run began from, not what that folder holds today
                config["init_from"] = old["init_from"]
            for key, fields in (defaults or {}).items():
                if isinstance(old.get(key), dict):
                    old[key] = {**json.loads(json.dumps(fields, default=str)), **old[key]}
            new = json.loads(json.dumps(config, default=str))  # as it will be stored: tuples become lists
            changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and k not in ("resume",)}
            refused = {k: v for k, v in changed.items() if k in fixed and k in old}
            if refused:
                raise UserError(f"{self.path}: --resume with settings that change the run: "
                                + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in refused.items())
                                + " (resume with the run's own settings, or start a new --run-dir)")
            if changed:
                self.log(f"resuming with changed settings: {changed}")
        self._write_json("config.json", config)

    def _write_json(self, name: str, obj) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, self.path / name)

    def log(self, msg: str, echo: bool = True) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if echo:
            print(line, flush=True)
        with open(self.path / "log.txt", "a") as f:
            f.write(line + "\n")

    def metrics(self, **kv) -> None:
        kv = {"time": round(time.time() - self.t0, 2), **kv}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(kv) + "\n")

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict, keep: int = 2) -> Path:
        """weights: {"model": state_dict, "ema": state_dict, ...} -> <name>.safetensors; state -> state.pt."""
        ckpt = self.path / f"ckpt-{step:08d}"
        tmp = self.path / f".ckpt-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, sd in weights.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save({"step": step, **state, "global_rng": global_rng_state()}, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(tmp, ckpt)
        latest = self.path / ".latest.tmp"
        latest.write_text(ckpt.name)
        os.replace(latest, self.path / "latest")
        _fsync(self.path)
        for old in sorted(self.path.glob("ckpt-*"))[:-max(keep, 2)]:
            shutil.rmtree(old, ignore_errors=True)
        return ckpt

    def checkpoint(self, step: int, modules: dict, objects: dict, keep: int = 2) -> Path:
        """save() of the modules' weights and the objects' states (optimizers, schedulers, torch.Generators), by
        name; entries that are None are left out. restore() reads them back."""
        return self.save(step, {name: m.state_dict() for name, m in modules.items() if m is not None},
                         {name: o.get_state() if isinstance(o, torch.Generator) else o.state_dict()
                          for name, o in objects.items() if o is not None}, keep)

    def restore(self, modules: dict, objects: dict, optional: tuple = ()) -> int:
        """The latest checkpoint loaded into what checkpoint() saved (see restore_checkpoint); logs and returns
        its step, 0 when there is none."""
        step = restore_checkpoint(self.path, modules, objects, optional)
        if step:
            self.log(f"resumed at step {step}")
        return step

    def sample_grid(self, tag: str, step: int, images, reference=None) -> Path:
        """samples/<tag>-<step>.png: the first 64 images (in [-1, 1]) as a grid of 8 per row; with `reference`
        (e.g. the originals of reconstructions), the first 16 of it in a row above the first 16 images."""
        path = self.path / "samples" / f"{tag}-{step:08d}.png"
        grid = image_grid(images[:64]) if reference is None else rows_grid(reference, images, n=16)
        Image.fromarray(grid).save(path)
        return path

    def elapsed(self) -> float:
        return time.time() - self.t0


def restore_checkpoint(run_path: Path, modules: dict, objects: dict, optional: tuple = ()) -> int:
    """Load a run folder's latest checkpoint into `modules` (their weights, by name) and `objects` (optimizers,
    schedulers, torch.Generators: their state, by name), skipping entries that are None; a name in `optional` may
    be missing from the checkpoint (a part added on resume), any other is an error. Returns the step (0: none)."""
    ck = load_checkpoint(run_path)
    if ck is None:
        return 0
    step, weights, state = ck
    if "global_rng" in state:  # checkpoints from before it was saved resume with fresh global RNG streams
        set_global_rng_state(state["global_rng"])
    for name, m in modules.items():
        if m is not None and (name in weights or name not in optional):
            m.load_state_dict(_entry(weights, name, run_path))
    for name, o in objects.items():
        if o is not None and (name in state or name not in optional):
            (o.set_state if isinstance(o, torch.Generator) else o.load_state_dict)(_entry(state, name, run_path))
    return step


def global_rng_state() -> dict:
    """The process-wide random streams a trainer may draw from without a generator of its own (torch's CPU and
    CUDA defaults, numpy's, Python's): saved with each checkpoint so that a resumed run draws what an uninterrupted
    one would have."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def set_global_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])
    if saved.get("cuda") is not None and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _entry(saved: dict, name: str, run_path: Path):
    if name not in saved:
        raise UserError(f"{run_path}: its checkpoint has no {name!r} (it holds {sorted(saved)}); was it written by "
                        f"another trainer or with other options?")
    return saved[name]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(run_path: Path):
    """(step, {name: state_dict}, state) of a run folder's newest checkpoint that loads, or None if there is none:
    `latest` first, then the older ones, newest first (a warning names each one skipped)."""
    run_path = Path(run_path)
    if not (run_path / "latest").exists():
        return None
    latest = run_path / (run_path / "latest").read_text().strip()
    candidates = [latest] + sorted((p for p in run_path.glob("ckpt-*") if p != latest), reverse=True)
    for ckpt in candidates:
        try:
            weights = {p.stem: load_file(str(p)) for p in ckpt.glob("*.safetensors")}
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
            return state["step"], weights, state
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint of any kind: try the one before it
            print(f"warning: {ckpt} does not load ({type(e).__name__}: {str(e)[:200]}); trying the one before it",
                  flush=True)
    raise UserError(f"{run_path}: no checkpoint loads ({', '.join(p.name for p in candidates)}); start a new run")
