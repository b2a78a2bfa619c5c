"""The scaffold every training loop shares: settings resolved from a preset and the command line, and the progress
bar with its periodic metrics line."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from python.training.rundir import RunDir


def resolve_config(preset: dict, args: argparse.Namespace) -> dict:
    """The preset's settings overridden by every option given on the command line (those not None), paths as
    strings: what the run folder's config.json records."""
    cfg = {**preset, **{k: v for k, v in vars(args).items() if v is not None}}
    return {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}


class Progress:
    """A tqdm bar over the training steps and, every `every` steps (and at the last), one metrics.jsonl line with
    the interval's images/s. `show` names the metrics also shown on the bar. Without a run folder (a DDP rank
    other than 0) it shows and writes nothing."""

    def __init__(self, run: RunDir | None, total: int, initial: int = 0, every: int = 20, show: tuple = ("loss",)):
        self.run, self.total, self.every, self.show = run, total, every, show
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=run is None)
        self.t_last, self.seen = time.time(), 0

    def step(self, step: int, images: int, metrics: Callable[[], dict]) -> None:
        """One step done on `images` images; metrics() (called only when a line is due, since reading a loss
        off a GPU waits for it) gives the line's figures."""
        self.seen += images
        self.bar.update(1)
        if self.run is None or not (step % self.every == 0 or step == self.total):
            return
        rate = self.seen / (time.time() - self.t_last)
        values = metrics()
        self.bar.set_postfix(**{k: f"{values[k]:.4g}" for k in self.show if k in values}, img_s=f"{rate:.0f}")
        self.run.metrics(step=step, **values, images_per_sec=rate)
        self.t_last, self.seen = time.time(), 0

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
