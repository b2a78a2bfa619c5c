"""Score a VAE on a rendered dataset's labelled held-out renders; print one JSON line.

    python -m python.eval_vae --data data/iclevr [--vae weights/vae] [--judge checkpoint.pth]

Figures: psnr (dB, images in [-1, 1]), acc_orig and acc_recon (the primary judge's official top-k
accuracy on the originals and on their reconstructions, and their ratio), decode_images_per_sec
(decoder alone, batch 256, this machine's CPU, median of 5 timed runs after a warm-up) and
decoder_mflops (per image, counted by torch's FLOP counter: 2 x multiply-adds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from python.core.errors import UserError, cli
from python.data.dataset import load_split, to_model_range
from python.models.judge import judge_score, load_judge
from python.models.vae import VAE, load_vae, psnr, reconstruct


def decoder_flops(vae: VAE) -> float:
    z = torch.zeros(1, *vae.cfg.latent_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(z)
    return float(fc.get_total_flops())


@torch.no_grad()
def decode_rate(vae: VAE, batch: int = 256, repeats: int = 5) -> float:
    z = torch.randn(batch, *vae.cfg.latent_shape, generator=torch.Generator().manual_seed(0))
    vae.decode(z)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        vae.decode(z)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def evaluate(vae: VAE, data: Path, judge_path: Path | None = None, limit: int | None = None) -> dict:
    data = Path(data)
    if not (data / "heldout_renders.json").exists():
        raise UserError(f"{data}: no heldout_renders.json (render a dataset with `python -m python.make_data`)")
    held = load_split(data, "heldout_renders.json", images=data / "heldout_renders", progress=False)
    images, labels = held.images[:limit], held.labels[:limit]
    x = to_model_range(images)
    rec = reconstruct(vae, images)
    judge = load_judge(judge_path)
    acc_o, acc_r = judge_score(judge, x, labels)["accuracy"], judge_score(judge, rec, labels)["accuracy"]
    return {"psnr": round(float(psnr(x, rec).mean()), 3), "acc_orig": round(acc_o, 4), "acc_recon": round(acc_r, 4),
            "recon_over_orig": round(acc_r / max(acc_o, 1e-9), 4), "images": len(images),
            "decode_images_per_sec": round(decode_rate(vae), 1), "decoder_mflops": round(decoder_flops(vae) / 1e6, 1),
            "threads": torch.get_num_threads(), "arch": vae.cfg.arch, "latent": list(vae.cfg.latent_shape)}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/iclevr"))
    parser.add_argument("--vae", type=Path, help="VAE folder (config.json + vae.safetensors); default: shipped")
    parser.add_argument("--judge", type=Path, help="judge checkpoint; default: the shipped primary judge")
    parser.add_argument("--limit", type=int, help="score only the first N held-out renders")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(load_vae(args.vae), args.data, args.judge, args.limit)))


if __name__ == "__main__":
    main()
