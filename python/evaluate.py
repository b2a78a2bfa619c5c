"""Score a folder of generated images the way the course grades them.

    python -m python.evaluate --images out/test --conditions data/iclevr/test.json [--judge checkpoint.pth]

The folder holds 0.png ... N-1.png, image i generated for condition i of the condition file. Images
get the course's preprocessing (RGB, 64x64, [-1, 1]); the judge (default: the shipped primary judge,
or the course's checkpoint.pth) gives the official top-k accuracy. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from python.core.errors import UserError, cli
from python.core.labels import OBJECTS, load_conditions, load_objects
from python.data.dataset import load_image64, to_model_range
from python.models.judge import judge_score, load_judge


def load_numbered_images(folder: Path, n: int) -> np.ndarray:
    """0.png ... n-1.png from folder as (n, 64, 64, 3) uint8; a gap or a surplus is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found")
    numbered = sorted(int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.png", p.name)))
    missing = sorted(set(range(n)) - set(numbered))
    if missing:
        raise UserError(f"{folder}: missing {len(missing)} image(s), e.g. {missing[0]}.png; expected 0.png ... "
                        f"{n - 1}.png, one per condition")
    if len(numbered) != n:
        raise UserError(f"{folder}: {len(numbered)} numbered images but {n} conditions; expected exactly 0.png ... "
                        f"{n - 1}.png")
    return np.stack([load_image64(folder / f"{i}.png") for i in range(n)])


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder with 0.png ... N-1.png")
    parser.add_argument("--conditions", type=Path, required=True, help="test.json-style list of label lists")
    parser.add_argument("--objects", type=Path, help="objects.json (default: the official 24-class mapping)")
    parser.add_argument("--judge", type=Path, help="checkpoint.pth (official layout) or .safetensors; default: shipped")
    parser.add_argument("--second-judge", action="store_true", help="also score with the shipped second judge")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    objects = load_objects(args.objects) if args.objects else OBJECTS
    labels = load_conditions(args.conditions, objects)
    images = to_model_range(load_numbered_images(args.images, len(labels)))
    res = {"conditions": str(args.conditions), **judge_score(load_judge(args.judge, args.device), images, labels)}
    if args.second_judge:
        res["second_judge"] = judge_score(load_judge(None, args.device, which="second"), images, labels)["accuracy"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
