"""Train a label classifier of latents on real latents only (best-of-N selection, class terms).

    python -m python.train_classifier --data data/iclevr --run-dir runs/classifier --out weights/classifier
    python -m python.train_classifier --pixels --data data/iclevr --run-dir runs/pixel_classifier   # reads decoded images

It never sees a judge, a judge's outputs or a generated latent (python/models/classifier.py says why), so the
judges that score the result stay independent of it. Its own held-out accuracy (top-k, the official metric, on
latents of training images kept out) is logged to metrics.jsonl and written to the weights folder's config.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from python.core.errors import UserError, cli
from python.models.classifier import save_classifier
from python.models.vae import SHIPPED_VAE, vae_digest
from python.training.classifier import train_classifier
from python.training.latents import load_latents
from python.training.loop import resolve_config
from python.training.rundir import RunDir


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/iclevr"))
    p.add_argument("--vae", type=Path, help="VAE folder (default: shipped weights/vae)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/classifier"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--noise", type=float, default=0.0, help="max std of Gaussian noise added to training latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", action="store_true",
                   help="classify the decoded image (frozen VAE decoder + a small CNN) instead of the latent: "
                        "stricter about shape; for distill's class term, not for best-of selection (~5x the FLOPs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the fp16 weights folder here (e.g. weights/classifier)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch < 1:
        raise UserError(f"--steps and --batch must be >= 1 (got {a.steps}, {a.batch})")
    vae_folder = a.vae or SHIPPED_VAE
    device = torch.device(a.device)
    lat = load_latents(a.data, vae_folder).to(device)
    cfg = resolve_config({}, a)
    cfg["vae_sha"] = vae_digest(vae_folder)
    run = RunDir(a.run_dir, cfg, resume=(a.run_dir / "classifier.safetensors").exists())
    cls = train_classifier(lat, a.steps, a.batch, a.seed, run, a.noise, device,
                           pixels_vae=vae_folder if a.pixels else None).cpu()
    extra = {"vae_sha": cfg["vae_sha"], "steps": a.steps, "batch": a.batch, "noise": a.noise, "seed": a.seed,
             "heldout_accuracy": round(cls.heldout_accuracy, 4), "train_seconds": round(run.elapsed(), 1)}
    for folder in [run.path / "final"] + ([a.out] if a.out else []):
        save_classifier(cls, folder, extra)
    print(json.dumps({"final": str(run.path / "final"), **extra}))


if __name__ == "__main__":
    main()
