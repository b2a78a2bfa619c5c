"""Renderer throughput: images/sec of the synthetic i-CLEVR renderer on this machine.

    python bench/render_rate.py [--scenes 300] [--workers N]

Renders training-style scenes (3 objects added one at a time -> 3 PNGs each, as make_data does) into a
temporary folder and prints one JSON line: images/sec, and the projected time for the default
18,009-image dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python.data.synthetic import pool_map, render_train_scene  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        pool_map(render_train_scene, [(12345, s, Path(d), (160, 120), 3) for s in range(args.scenes)], args.workers, "bench")
        dt = time.time() - t
    rate = 3 * args.scenes / dt
    print(json.dumps({"images_per_sec": round(rate, 1), "workers": args.workers, "scenes": args.scenes,
                      "projected_default_dataset_seconds": round(18009 / rate, 1),
                      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
