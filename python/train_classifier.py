"""Train a label classifier of latents on real latents only (best-of-N selection, class terms).

    python -m python.train_classifier --data data/iclevr --run-dir runs/classifier --out weights/classifier
    python -m python.train_classifier --pixels --data data/iclevr --run-dir runs/pixel_classifier   # reads decoded images
    python -m python.train_classifier --counts 24000 --run-dir runs/counter     # object counter on fresh renders
    python -m python.train_classifier --counts 24000 --total-only --widths 32 64 128 --noise 0.5 --run-dir runs/total \
        --out weights/guide/counter                               # the count term of the LDM's classifier guidance
    python -m python.train_classifier --faint 12000 --noise 0.5 --data data/iclevr --run-dir runs/cls_faint  # ghosts absent

--counts N trains the object counter (python/models/classifier.py CountClassifier) instead: N fresh scenes of 1-5
objects in which a class may repeat (the official data never repeats one) are rendered and encoded into the run
folder (reused on a rerun), and it learns which classes each latent holds and how many objects in all (its held-out
figures: the label set read exactly, and the total). With --total-only, the total alone (a smaller network, what
the LDM's classifier guidance reads for "as many objects as requested", python/models/classifier.py).

--faint N adds N fresh renders (0-3 solid objects and one more blended in at opacity 0.1-0.5) labelled with their
solid objects only, a quarter of each batch: the classifier learns that a ghost is not an object, so a class term
built on it asks a generator for solid objects instead of being satisfied by faint ones (the one-step student's
failure, weights/gan/MODEL_CARD.md). Its held-out figures then also say how often a ghost is called present.

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
from python.models.classifier import LATENT_WIDTHS, save_classifier
from python.models.vae import SHIPPED_VAE, vae_digest
from python.training.classifier import train_classifier, train_count_classifier
from python.training.latents import LatentSet, count_latents, faint_latents, load_latents
from python.training.loop import add_run_options, resolve_config
from python.training.rundir import RunDir


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "classifier", judge=None, resume=False, device=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.0, help="max std of Gaussian noise added to training latents")
    parser.add_argument("--pixels", action="store_true",
                   help="classify the decoded image (frozen VAE decoder + a small CNN) instead of the latent: "
                        "stricter about shape; for distill's class term, not for best-of selection (~5x the FLOPs)")
    parser.add_argument("--counts", type=int, metavar="N",
                        help="train the object counter on N fresh renders (1-5 objects, repeats allowed) instead")
    parser.add_argument("--total-only", action="store_true",
                        help="--counts: train only the total-count network (0..5+ objects), not the labels")
    parser.add_argument("--widths", type=int, nargs=3, metavar="W", default=list(LATENT_WIDTHS),
                        help="the latent network's stage widths (default %s; not with --pixels)"
                             % " ".join(map(str, LATENT_WIDTHS)))
    parser.add_argument("--faint", type=int, metavar="N",
                        help="also train on N fresh renders holding one half-transparent object (opacity 0.1-0.5) "
                             "labelled absent, a quarter of each batch: a class term from this classifier is not "
                             "satisfied by a ghost (python.data.synthetic.render_faint_arrays)")
    parser.add_argument("--workers", type=int, help="--counts, --faint: rendering processes (default: all cores; 1 renders "
                                                    "in this process, as from inside a program that already ran torch)")
    parser.add_argument("--out", type=Path, help="also write the fp16 weights folder here (e.g. weights/classifier)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise UserError(f"--steps and --batch must be >= 1 (got {args.steps}, {args.batch})")
    if args.counts is not None and args.counts < 20:
        raise UserError(f"--counts must be >= 20 scenes (a tenth is held out), got {args.counts}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.faint is not None and args.faint < 20:
        raise UserError(f"--faint must be >= 20 scenes (a tenth is held out), got {args.faint}")
    if args.faint is not None and (args.counts is not None or args.pixels):
        raise UserError("--faint trains the latent label classifier; it does not go with --counts or --pixels")
    if args.total_only and args.counts is None:
        raise UserError("--total-only trains the total counter; it needs --counts N (the renders it learns from)")
    if min(args.widths) < 1:
        raise UserError(f"--widths must be >= 1, got {args.widths}")
    if args.pixels and tuple(args.widths) != LATENT_WIDTHS:
        raise UserError("--widths sets the latent networks' widths; the pixel classifier (--pixels) has its own")
    if args.counts is not None and args.pixels:
        raise UserError("--counts trains a counter of latents; it does not take --pixels")
    vae_folder = args.vae or SHIPPED_VAE
    device = torch.device(args.device)
    cfg = resolve_config({}, args)
    cfg["vae_sha"] = vae_digest(vae_folder)
    run = RunDir(args.run_dir, cfg, resume=(args.run_dir / "classifier.safetensors").exists(),
                 fixed=("vae_sha", "pixels", "counts", "faint", "total_only", "widths"))
    if args.counts:
        counts_lat = count_latents(run.path / "count-latents.npz", args.counts, args.seed, vae_folder, args.workers,
                                   log=run.log)
        counts = counts_lat.labels.long()
        lat = LatentSet(counts_lat.mean, counts_lat.std, (counts > 0).float(), counts_lat.scale_factor)
        cls = train_count_classifier(lat.to(device), counts, args.steps, args.batch, args.seed, run, args.noise,
                                     device, args.total_only, tuple(args.widths)).cpu()
    else:
        lat = load_latents(args.data, vae_folder).to(device)
        faint = faint_latents(run.path / "faint-latents.npz", args.faint, args.seed, vae_folder, args.workers,
                              log=run.log) if args.faint else None
        cls = train_classifier(lat, args.steps, args.batch, args.seed, run, args.noise, device,
                               pixels_vae=vae_folder if args.pixels else None, faint=faint,
                               widths=tuple(args.widths)).cpu()
    extra = {"vae_sha": cfg["vae_sha"], "steps": args.steps, "batch": args.batch, "noise": args.noise, "seed": args.seed,
             "train_seconds": round(run.elapsed(), 1)}
    if cls.heldout_accuracy is not None:
        extra["heldout_accuracy"] = round(cls.heldout_accuracy, 4)
    if args.counts:
        extra.update(scenes=args.counts, objects="1-5, a class may repeat (render_count_arrays)",
                     heldout_total_accuracy=round(cls.heldout_total_accuracy, 4))
    if args.faint:
        extra.update(faint_scenes=args.faint, faint="0-3 solid objects and one at opacity 0.1-0.5 labelled absent "
                                                    "(render_faint_arrays), a quarter of each batch",
                     faint_called_present=round(cls.faint_called_present, 4),
                     solid_beside_faint_found=round(cls.solid_beside_faint_found, 4))
    for folder in [run.path / "final"] + ([args.out] if args.out else []):
        save_classifier(cls, folder, extra)
    print(json.dumps({"final": str(run.path / "final"), **extra}))


if __name__ == "__main__":
    main()
