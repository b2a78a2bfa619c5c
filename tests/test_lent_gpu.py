"""scripts/lent_gpu_ldm.sh, the one prepared call for a lent GPU, dry-run on the CPU at a tiny size: it renders, trains
under its time budget, ships, and leaves what the device tool brings back (at most 8 files, two folders deep)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from python.models.denoiser import load_denoiser

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, **settings) -> tuple[Path, list[str]]:
    """The script at a tiny size on the CPU with `settings` (its environment variables); (OUT, the files in it)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable, "DEVICE": "cpu",
           "MINUTES": "5", "BATCH": "8", "SCENES": "10", "OMP_NUM_THREADS": "1",
           "DATA_ARGS": "--heldout-images 40 --heldout-conditions 8", **settings}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "lent_gpu_ldm.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_lent_gpu_script_dry_run_on_cpu(tmp_path):
    out, files = _dry_run(tmp_path, STEPS="3", INIT="none",
                          EXTRA="--width 32 --depth 2 --heads 2 --eval-conditions 4 --eval-steps 2 --no-bf16")
    assert files == ["device.txt", "heldout.png", "ldm/config.json", "ldm/denoiser.safetensors", "log.txt",
                     "metrics.jsonl", "model.safetensors", "run_config.json"]
    model, cfg = load_denoiser(out / "ldm")
    assert model.cfg.width == 32 and model.cfg.pooled  # from scratch: the pooled embedding, as the recipe says
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert json.loads((out / "run_config.json").read_text())["steps"] == 3
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in evals if "heldout_subset" in m] == [3]
    timings = (out / "device.txt").read_text()
    assert "render start" in timings and "train end" in timings and "STEPS=3" in timings


def test_lent_gpu_script_carries_a_layout_model_on_as_one(tmp_path, layout_export):
    """INIT a layout denoiser: the script adds --layout, and its placement prior comes back in the probe grid's
    place (still 8 files)."""
    root, _ = layout_export
    out, files = _dry_run(tmp_path, STEPS="2", INIT=str(root / "ldm"),
                          EXTRA=f"--vae {root / 'vae'} --width 32 --depth 2 --heads 2 --eval-conditions 4 "
                                "--eval-steps 2 --layout-bank 8 --no-bf16")
    assert files == ["device.txt", "ldm/config.json", "ldm/denoiser.safetensors", "ldm/layouts.npz", "log.txt",
                     "metrics.jsonl", "model.safetensors", "run_config.json"]
    model, _ = load_denoiser(out / "ldm")
    assert model.cfg.layout and len(model.layout_bank.slots[5]) == 8
