"""Train the evaluation's object counter (python/models/counter.py) on fresh renders: how many objects an image holds.

    python -m python.train_counter --run-dir runs/image_counter --out weights/counter
    python -m python.train_counter --scenes 60 --steps 3 --run-dir DIR        # seconds, for tests

N scenes of 1-5 objects in which a class may repeat are rendered (render_count_arrays, its own --seed; cached in the
run folder as count-renders.npz and reused by a rerun), a tenth held out, and the CNN trained on the rest with
horizontal flips and a little pixel noise (one-cycle AdamW). Its held-out figures, written to the weights folder's
config.json: the share of held-out renders whose total it reads exactly, and of their VAE reconstructions (what a
generator in this latent space can at best draw), beside the mean counted-minus-true difference of each.

It never sees a generated image, a judge or a judge's output, and nothing is trained against it: the trainers'
count term reads a different network (the latent counter, python -m python.train_classifier --counts).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from python.core.errors import UserError, cli
from python.data.dataset import to_model_range
from python.data.synthetic import render_count_arrays
from python.models.counter import ImageCounter, count_objects, save_counter
from python.models.vae import SHIPPED_VAE, load_vae, reconstruct, vae_digest
from python.training.loop import add_run_options, optimiser_step, resolve_config
from python.training.losses import noise_augment
from python.training.rundir import RunDir


def count_renders(path: Path, scenes: int, seed: int, workers: int | None, log) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 64, 64, 3) uint8, per-class counts (N, 24) int64) of `scenes` fresh renders, cached at `path`."""
    if path.exists():
        with np.load(path) as f:
            if f["requested"] == scenes:
                return f["images"], f["counts"]
        log(f"{path}: rendered for another --scenes; rendering again")
    images, counts = render_count_arrays(seed, scenes, workers=workers)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, counts=counts, requested=scenes)
    os.replace(tmp, path)
    log(f"rendered {len(images)} scenes of 1-5 objects (seed {seed}) into {path}")
    return images, counts


def held_out_figures(net: ImageCounter, images: torch.Tensor, totals: torch.Tensor) -> dict:
    d = count_objects(net, images) - totals
    return {"accuracy": round(float((d == 0).float().mean()), 4), "excess_mean": round(float(d.float().mean()), 4)}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "image_counter", judge=None, resume=False, device=True)
    parser.set_defaults(seed=11)  # the latent counter's scenes are stream 7: these are other renders
    parser.add_argument("--scenes", type=int, default=12000, help="fresh renders (1-5 objects, repeats allowed)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.1, help="max std of Gaussian noise added to training images")
    parser.add_argument("--widths", type=int, nargs=4, default=[24, 48, 96, 128], metavar="W",
                        help="the CNN's four stage widths (default 24 48 96 128: 0.42M parameters, 0.8 MB in fp16)")
    parser.add_argument("--workers", type=int, help="rendering processes (default: all cores)")
    parser.add_argument("--out", type=Path, help="also write the fp16 weights folder here (e.g. weights/counter)")
    args = parser.parse_args(argv)
    if args.scenes < 20:
        raise UserError(f"--scenes must be >= 20 (a tenth is held out), got {args.scenes}")
    if args.steps < 1 or args.batch < 1:
        raise UserError(f"--steps and --batch must be >= 1 (got {args.steps}, {args.batch})")
    if not 0 <= args.noise < float("inf"):
        raise UserError(f"--noise must be >= 0, got {args.noise}")
    if min(args.widths) < 1:
        raise UserError(f"--widths must be positive, got {args.widths}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    vae_folder = args.vae or SHIPPED_VAE
    vae = load_vae(vae_folder)  # before the run folder: a bad --vae leaves nothing behind
    cfg = resolve_config({}, args)
    run = RunDir(args.run_dir, cfg, resume=(args.run_dir / "count-renders.npz").exists(), fixed=("scenes", "seed"))
    images_u8, counts = count_renders(run.path / "count-renders.npz", args.scenes, args.seed, args.workers, run.log)
    device = torch.device(args.device)
    net = ImageCounter(widths=tuple(args.widths)).to(device)
    totals = torch.from_numpy(counts).sum(1).clamp(max=net.max_total)
    held = max(len(images_u8) // 10, 1)
    train_x, train_y = to_model_range(images_u8[:-held]).to(device), totals[:-held].to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    net.train()
    for _ in tqdm(range(args.steps), desc="image counter", unit="step", dynamic_ncols=True):
        idx = torch.randint(0, len(train_x), (args.batch,), generator=gen, device=device)
        x = train_x[idx]
        flip = torch.rand(args.batch, generator=gen, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = noise_augment(x, args.noise, gen)
        loss = F.cross_entropy(net(x), train_y[idx])
        optimiser_step(loss, opt, sched)
    net = net.eval().requires_grad_(False).cpu()
    held_u8, held_y = images_u8[-held:], totals[-held:]
    figures = {"renders": held_out_figures(net, to_model_range(held_u8), held_y),
               "vae_reconstructions": held_out_figures(net, reconstruct(vae, held_u8), held_y)}
    run.metrics(step=args.steps, heldout=figures, heldout_scenes=held)
    run.log(f"image counter: {args.steps} steps; total right on {figures['renders']['accuracy']:.4f} of {held} "
            f"held-out renders, {figures['vae_reconstructions']['accuracy']:.4f} of their VAE reconstructions")
    extra = {"scenes": args.scenes, "seed": args.seed, "objects": "1-5, a class may repeat (render_count_arrays)",
             "steps": args.steps, "batch": args.batch, "noise": args.noise, "heldout": figures,
             "vae_sha": vae_digest(vae_folder), "train_seconds": round(run.elapsed(), 1)}
    for folder in [run.path / "final"] + ([args.out] if args.out else []):
        save_counter(net, folder, extra)
    print(json.dumps({"final": str(run.path / "final"), **extra}))


if __name__ == "__main__":
    main()
