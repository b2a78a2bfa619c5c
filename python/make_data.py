"""Render a synthetic i-CLEVR dataset in the official format.

    python -m python.make_data --out data/iclevr --scenes 6003 --seed 0

writes iclevr/CLEVR_train_{scene:06d}_{k}.png (4:3 RGBA; objects added one at a time, k = 0, 1, 2),
train.json, objects.json, test.json, new_test.json (32 conditions each), heldout.json (conditions
with 1-3 objects, including combinations absent from train.json), heldout_45.json (4-5 objects,
never seen in training), a labelled held-out render set (heldout_renders/ + heldout_renders.json,
1-5 objects, its own random stream), contact_sheet.png and stats.json.

The renderer and the dataset writer live in python/data/ (render.py, synthetic.py); this is the command line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from python.core.errors import UserError, cli
from python.data.synthetic import make_dataset


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/iclevr"), help="output folder (default data/iclevr)")
    parser.add_argument("--scenes", type=int, default=6003, help="training scenes; 3 images each (default 6003 -> 18,009)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-images", type=int, default=2000, help="labelled held-out renders (1-5 objects)")
    parser.add_argument("--heldout-conditions", type=int, default=1024, help="conditions in heldout.json")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--size", default="160x120", help="render resolution WxH, 4:3 (default 160x120; CLEVR is 320x240)")
    args = parser.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(size) == 2 and min(size) >= 32
    except (ValueError, AssertionError):
        raise UserError(f"--size: expected WxH with both >= 32, e.g. 160x120; got {args.size!r}") from None
    for flag, v, lo in (("--scenes", args.scenes, 1), ("--heldout-images", args.heldout_images, 0),
                        ("--heldout-conditions", args.heldout_conditions, 1)):
        if v < lo:
            raise UserError(f"{flag}: must be >= {lo}, got {v}")
    stats = make_dataset(args.out, args.scenes, args.seed, args.heldout_images, args.heldout_conditions, args.workers, size)
    print(json.dumps({k: stats[k] for k in ("train_images_per_sec", "train_seconds", "heldout_conditions_absent_from_train")}))
    print(f"wrote {args.out} ({stats['train']['images']} training images, contact sheet {args.out / 'contact_sheet.png'})")


if __name__ == "__main__":
    main()
