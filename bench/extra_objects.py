"""Where the unrequested objects come from: for each generated image, the judge's reading (p > 0.5) set against the
requested label set, split by label-set size, by whether the label set occurs in train.json, and by what an extra
object shares with the requested ones (its colour, its shape, neither).

    python bench/extra_objects.py --data data/iclevr [--model ldm|gan] [--limit 384] [--steps 10] [--guidance 4] \\
        [--sampler dpmpp|ddim|ddpm] [--eta 0] \\
        [--grid docs/ldm_extra_objects.png] [--json out.json]

An extra object of a requested colour but another shape is a duplicated colour (the model drew that colour twice) or
a shape it drew ambiguously; one sharing neither is an object from nowhere. The judge reads the images; nothing here
trains or selects anything.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from python.core.diffusion import (  # noqa: E402
    DEFAULT_APG_NORM,
    DEFAULT_CLASS_ITERS,
    DEFAULT_CLASS_SCALE,
    DEFAULT_GUIDANCE,
    check_class_iters,
    check_class_scale,
)
from python.core.errors import UserError, cli  # noqa: E402
from python.core.images import image_grid  # noqa: E402
from python.core.labels import CLASS_NAMES, encode, read_json  # noqa: E402


def analyse(probs: np.ndarray, cond: np.ndarray, seen: np.ndarray) -> dict:
    """The figures from the judge's probabilities (N, 24), the multi-hot requests (N, 24) and, per row, whether its
    label set occurs in the training set."""
    found, asked = probs > 0.5, cond > 0.5
    k = asked.sum(1)
    top = np.argsort(-probs, 1, kind="stable")
    acc = np.array([asked[i, top[i, :k[i]]].sum() / k[i] for i in range(len(k))])
    extra = found & ~asked
    unrequested = extra.any(1)
    out = {"images": int(len(k)), "accuracy": float(acc.mean()), "unrequested": float(unrequested.mean()),
           "by_objects": {}, "by_training_label_set": {}}
    for n in sorted(set(k.tolist())):
        m = k == n
        out["by_objects"][int(n)] = {"images": int(m.sum()), "accuracy": float(acc[m].mean()),
                                     "unrequested": float(unrequested[m].mean()),
                                     "objects_seen_mean": float(found[m].sum(1).mean())}
    for name, m in (("in_train", seen), ("not_in_train", ~seen)):
        if m.any():
            out["by_training_label_set"][name] = {"images": int(m.sum()), "accuracy": float(acc[m].mean()),
                                                  "unrequested": float(unrequested[m].mean())}
    kinds = {"same_colour": 0, "same_shape_only": 0, "neither": 0}
    for i, j in zip(*np.nonzero(extra)):
        colour, shape = CLASS_NAMES[j].split()
        requested = [CLASS_NAMES[r].split() for r in np.flatnonzero(asked[i])]
        kind = ("same_colour" if any(c == colour for c, _ in requested) else
                "same_shape_only" if any(s == shape for _, s in requested) else "neither")
        kinds[kind] += 1
    out["extra_objects"] = kinds
    return out


@cli
def main(argv=None):
    import torch

    from python.models.classifier import load_class_grad
    from python.models.judge import judge_probs, load_judge
    from python.models.sampling import decode, gan_latents, ldm_latents
    from python.models.vae import Decoder, load_vae

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "iclevr")
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--model", choices=("ldm", "gan"), default="ldm")
    parser.add_argument("--file", default="heldout.json")
    parser.add_argument("--limit", type=int, default=384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", choices=("dpmpp", "ddim", "ddpm"), default="dpmpp")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic, 1: DDPM's noise)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="adaptive projected guidance's norm cap (0: classifier-free guidance; inf: no cap)")
    parser.add_argument("--class-scale", type=float, default=DEFAULT_CLASS_SCALE,
                        help="classifier guidance on x_0 with the weights folder's guide/ classifier (0: none)")
    parser.add_argument("--class-iters", type=int, default=DEFAULT_CLASS_ITERS,
                        help="descent steps of classifier guidance per sampler step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="PNG of the first 16 images with an unrequested object")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    check_class_scale(args.class_scale, "--class-scale")
    check_class_iters(args.class_iters, "--class-iters")
    if args.limit < 1 or args.steps < 1:
        raise UserError("--limit and --steps must be >= 1")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    labels = read_json(args.data / args.file)[: args.limit]
    train = read_json(args.data / "train.json")
    in_train = {tuple(sorted(v)) for v in (train.values() if isinstance(train, dict) else train)}
    seen = np.array([tuple(sorted(x)) in in_train for x in labels])
    cond = np.stack([encode(x, where=f"{args.file}[{i}]") for i, x in enumerate(labels)])
    decoder = Decoder(load_vae(args.weights / "vae")).eval()
    with torch.no_grad():
        if args.model == "ldm":
            from python.core.diffusion import Schedule
            from python.models.denoiser import load_denoiser

            model, cfg = load_denoiser(args.weights / "ldm")
            grad = load_class_grad(args.weights / "guide", args.weights / "vae") if args.class_scale else None
            lat = ldm_latents(model, Schedule(**cfg["schedule"]), cond, args.sampler, args.steps, args.guidance,
                              seed=args.seed, eta=args.eta, apg_norm=args.apg_norm, class_grad=grad,
                              class_scale=args.class_scale, class_iters=args.class_iters)
        else:
            from python.models.generators import load_generator

            lat = gan_latents(load_generator(args.weights / "gan")[0], cond, seed=args.seed)
        images = decode(decoder, lat)
        probs = judge_probs(load_judge(args.weights / "judge" / "judge.safetensors"), images).numpy()
    res = {"model": args.model, "file": args.file, "limit": args.limit, "seed": args.seed,
           **({"sampler": args.sampler, "eta": args.eta, "steps": args.steps, "guidance": args.guidance,
               "apg_norm": args.apg_norm, "class_scale": args.class_scale, "class_iters": args.class_iters}
              if args.model == "ldm" else {}),
           **analyse(probs, cond, seen)}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.grid:
        from PIL import Image

        rows = np.flatnonzero(((probs > 0.5) & (cond < 0.5)).any(1))[:16]
        Image.fromarray(image_grid(images[rows], cols=8)).save(args.grid)
    return res


if __name__ == "__main__":
    main()
