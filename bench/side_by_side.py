"""Generated images beside real renders of the same conditions: one column per condition, one row per source.

    python bench/side_by_side.py --data data/iclevr --gan weights/gan [--gan OTHER ...] [--ldm weights/ldm] \\
        [--file test.json] [--limit 16] [--seed 0] --out docs/gan_side_by_side.png

Row 1: a fresh render of each condition through the project's to64 (the data a generator should match); then one
row per generator, one sample each (the GAN path in one forward pass; the LDM with DPM-Solver++ --steps and
guidance), all from noise seed --seed. Rows are labelled at the left. Nothing here scores or selects: it is a
picture for eyes (softness, ghosts, doubled objects), the fidelity figures are python/evaluation/fidelity.py's.
"""
from __future__ import annotations

import argparse
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
from python.core.labels import encode, read_json  # noqa: E402

LABEL_WIDTH = 150


def compose(rows: list[tuple[str, np.ndarray]], pad: int = 2) -> np.ndarray:
    """[(label, (N, 64, 64, 3) uint8)] -> one uint8 image: each row's label at its left, then its N images."""
    from PIL import Image, ImageDraw

    n, h, w = rows[0][1].shape[:3]
    if any(imgs.shape[:3] != (n, h, w) for _, imgs in rows):
        raise UserError("every row needs the same number of images of the same size")
    out = Image.new("RGB", (LABEL_WIDTH + n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (h + pad)
        for i, line in enumerate(label.split("\n")[:4]):
            draw.text((4, y + 4 + 12 * i), line, fill="black")
        for c, im in enumerate(imgs):
            out.paste(Image.fromarray(im), (LABEL_WIDTH + pad + c * (w + pad), y))
    return np.asarray(out)


@cli
def main(argv=None):
    import torch

    from python.core.images import to_uint8
    from python.data.synthetic import render_conditions
    from python.models.classifier import load_class_grad
    from python.models.sampling import decode, gan_latents, ldm_latents
    from python.models.vae import SHIPPED_VAE, Decoder, load_vae

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "iclevr")
    parser.add_argument("--file", default="test.json")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--gan", type=Path, nargs="*", default=[], help="GAN-path weights folders, a row each")
    parser.add_argument("--ldm", type=Path, nargs="*", default=[], help="LDM weights folders, a row each")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--apg-norm", type=float, default=DEFAULT_APG_NORM,
                        help="adaptive projected guidance's norm cap (0: classifier-free guidance; inf: no cap)")
    parser.add_argument("--class-scale", type=float, default=DEFAULT_CLASS_SCALE,
                        help="classifier guidance on x_0 with --guide's classifier (0: none)")
    parser.add_argument("--class-iters", type=int, default=DEFAULT_CLASS_ITERS,
                        help="descent steps of classifier guidance per sampler step")
    parser.add_argument("--guide", type=Path, help="the guidance classifier's folder (default: guide/ beside --vae)")
    parser.add_argument("--vae", type=Path, default=SHIPPED_VAE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    check_class_scale(args.class_scale, "--class-scale")
    check_class_iters(args.class_iters, "--class-iters")
    if args.limit < 1 or args.steps < 1:
        raise UserError("--limit and --steps must be >= 1")
    if not args.gan and not args.ldm:
        raise UserError("nothing to show: give --gan and/or --ldm weights folders")
    labels = read_json(args.data / args.file)[: args.limit]
    cond = np.stack([encode(x, where=f"{args.file}[{i}]") for i, x in enumerate(labels)])
    rows = [(f"real renders\n{args.file}[:{len(cond)}]", render_conditions(cond, 1))]
    decoder = Decoder(load_vae(args.vae)).eval()
    with torch.no_grad():
        for folder in args.gan:
            from python.models.generators import load_generator

            gen, cfg = load_generator(folder)
            what = cfg.get("objective", cfg.get("kind"))
            images = decode(decoder, gan_latents(gen, cond, seed=args.seed))
            rows.append((f"GAN path, one pass\n{folder.name} ({what})", to_uint8(images)))
        for folder in args.ldm:
            from python.core.diffusion import Schedule
            from python.models.denoiser import load_denoiser

            model, cfg = load_denoiser(folder)
            guide = args.guide or args.vae.parent / "guide"
            grad = load_class_grad(guide, args.vae) if args.class_scale else None
            lat = ldm_latents(model, Schedule(**cfg["schedule"]), cond, "dpmpp", args.steps, args.guidance,
                              seed=args.seed, apg_norm=args.apg_norm, class_grad=grad, class_scale=args.class_scale,
                              class_iters=args.class_iters)
            apg = (f", APG {args.apg_norm:g}" if args.apg_norm else "") + (
                f", CG {args.class_scale:g} x{args.class_iters}" if args.class_scale else "")
            rows.append((f"LDM {args.steps} steps, g {args.guidance:g}{apg}\n{folder.name}",
                         to_uint8(decode(decoder, lat))))
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(compose(rows)).save(args.out)
    print(f"wrote {args.out}: {len(rows)} rows x {len(cond)} conditions")


if __name__ == "__main__":
    main()
