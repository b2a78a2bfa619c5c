"""Turn a training run's latest checkpoint into a shippable weights folder: the EMA weights, fp16, with the config
the loaders and the export need, and where they came from (`--raw`: the trained weights instead of the EMA).

    python -m python.ship ldm --run runs/ldm --out weights/ldm
    python -m python.ship gan --run runs/gan --out weights/gan

Works on a run that is still training (it reads the last complete checkpoint), so an interim model can be
shipped and a later session can warm-start from it (`train_ldm --init weights/ldm`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from python.core.errors import UserError, cli
from python.core.layout import LayoutBank
from python.models.denoiser import Denoiser, denoiser_config, save_denoiser
from python.models.generators import build_generator, reads_layout, save_generator
from python.training.rundir import load_checkpoint


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("ldm", "gan"))
    parser.add_argument("--run", type=Path, required=True, help="run folder (with config.json and a checkpoint)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fp32", action="store_true", help="keep float32 (default: float16, half the bytes)")
    parser.add_argument("--raw", action="store_true", help="ship the trained weights themselves, not their EMA "
                                                           "(when the run's metrics show the raw ones scoring higher)")
    parser.add_argument("--force", action="store_true", help="replace the weights --out already holds (needs --card)")
    parser.add_argument("--card", type=Path, help="the new MODEL_CARD.md, copied into --out (required with --force "
                                                  "when the weights there have a card: it describes the old ones)")
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists():
        if not args.force:
            raise UserError(f"{args.out}: already holds weights; pass --force (and --card NEW_CARD.md) to replace them")
        if (args.out / "MODEL_CARD.md").exists() and args.card is None:
            raise UserError(f"{args.out}/MODEL_CARD.md describes the weights being replaced; give the new one with "
                            f"--card PATH")
    if args.card is not None and not args.card.is_file():
        raise UserError(f"--card {args.card}: file not found")
    if not (args.run / "config.json").exists():
        raise UserError(f"{args.run}: not a run folder (no config.json)")
    ck = load_checkpoint(args.run)
    if ck is None:
        raise UserError(f"{args.run}: no checkpoint yet")
    step, weights, _ = ck
    cfg = json.loads((args.run / "config.json").read_text())
    provenance = {"vae_sha": cfg.get("vae_sha"), "trained_steps": step, "run": str(args.run.resolve()),
                  "weights": "raw" if args.raw else "ema",
                  # the warm start's own provenance, nested back to the first run (python.models.weights.lineage)
                  **({"init_from": cfg["init_from"]} if cfg.get("init_from") else {})}
    if args.kind == "ldm":
        if "denoiser" not in cfg:
            raise UserError(f"{args.run}: not an LDM run (config.json has no 'denoiser')")
        model = Denoiser(denoiser_config(cfg, args.run))
        model.load_state_dict(weights["model" if args.raw else "ema"])
        if model.cfg.layout:  # the placement prior the run drew (python/core/layout.py) travels with the weights
            model.layout_bank = LayoutBank.load(args.run)
        # a distilled few-step denoiser (python.distill_ldm) says how it is meant to be sampled and from what
        distilled = {k: cfg[k] for k in ("sampling", "distilled_from") if k in cfg}
        save_denoiser(model.eval(), args.out, {"schedule": cfg["schedule"], **provenance, **distilled},
                      half=not args.fp32)
    else:  # a GAN run's generator, or python/distill.py's one-step student: either ships as the GAN path's
        if not {"kind", "gan", "distilled"} & set(cfg):
            raise UserError(f"{args.run}: not a GAN run (config.json has no 'gan')")
        gen = build_generator(cfg, args.run / "config.json")
        gen.load_state_dict(weights["generator" if args.raw else "ema"])
        if reads_layout(gen):  # a layout student's placement prior (its teacher's), kept with the run
            gen.layout_bank = LayoutBank.load(args.run)
        # what trained it, beside what it is (kind): e.g. objective "adversarial" and its discriminator's settings,
        # or "dmd" and the distribution matching's
        provenance.update({k: cfg[k] for k in ("objective", "discriminator", "dmd") if cfg.get(k) is not None})
        save_generator(gen.eval(), args.out, provenance, half=not args.fp32)
    if args.card is not None:
        tmp = args.out / ".MODEL_CARD.tmp"
        tmp.write_text(args.card.read_text())
        os.replace(tmp, args.out / "MODEL_CARD.md")
    print(json.dumps({"out": str(args.out), "step": step}))


if __name__ == "__main__":
    main()
