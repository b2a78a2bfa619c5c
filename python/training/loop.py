"""The scaffold every training loop shares: settings resolved from a preset and the command line, the progress
bar with its periodic metrics line, and the stop on SIGTERM / Ctrl-C that checkpoints first."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from python.core.errors import UserError
from python.training.rundir import RunDir

# Settings a trainer reads as counts (> 0) or as counts that may be 0; a value outside them would divide by zero
# (--save-every 0), train nothing and save an untrained model as final (--steps -5), or fail deep inside a loop.
POSITIVE = ("steps", "batch", "save_every", "eval_every", "eval_conditions", "eval_steps", "eval_images",
            "train_images", "width", "depth", "heads", "patch", "channels", "g_channels", "d_channels", "head_width",
            "d_t_max", "d_steps", "layout_bank")
NON_NEGATIVE = ("warmup", "seed", "val_pairs", "cls_steps", "d_warmup")
# (low, high, whether high is allowed) for the fractions and rates
RANGES = {"lr": (0.0, math.inf, False),  # lr 0: a step that changes nothing (tests of a warm start use it)
          "d_lr": (0.0, math.inf, False), "cls_weight": (0.0, math.inf, False), "mismatch": (0.0, math.inf, False),
          "ema": (0.0, 1.0, False), "p_uncond": (0.0, 1.0, False), "adv_weight": (0.0, math.inf, False),
          "dmd_weight": (0.0, math.inf, False), "fake_lr": (0.0, math.inf, False)}


def add_run_options(parser: argparse.ArgumentParser, run_dir: str, presets: dict | None = None,
                    vae: str | None = "VAE folder (default: shipped weights/vae)",
                    judge: str | None = "judge for the held-out figure (default: shipped primary)",
                    resume: bool = True, device: bool = False) -> argparse.ArgumentParser:
    """The options the trainers share: --data, --vae and --judge (with these help texts; None: not taken),
    --run-dir (default runs/<run_dir>), --preset (of `presets`), --seed, --resume and --device (where asked)."""
    parser.add_argument("--data", type=Path, default=Path("data/iclevr"), help="dataset folder (official format)")
    if vae:
        parser.add_argument("--vae", type=Path, help=vae)
    if judge:
        parser.add_argument("--judge", type=Path, help=judge)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / run_dir, help="the run folder")
    if presets:
        parser.add_argument("--preset", choices=presets, default="full")
    parser.add_argument("--seed", type=int, default=0)
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue the run folder's latest checkpoint")
    if device:
        import torch

        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def resolve_config(preset: dict, args: argparse.Namespace) -> dict:
    """The preset's settings overridden by every option given on the command line (those not None), paths as
    strings: what the run folder's config.json records."""
    cfg = {**preset, **{k: v for k, v in vars(args).items() if v is not None}}
    check_settings(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}


def check_settings(cfg: dict) -> None:
    """Refuse, before a run folder is made, a count that is not a positive (or non-negative) integer and a rate
    outside its range, naming the option and what is valid."""
    def option(k):
        return "--" + k.replace("_", "-")

    for k, v in cfg.items():
        if isinstance(v, bool) or v is None:
            continue
        if k in POSITIVE and not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                     for x in (v if isinstance(v, (list, tuple)) else [v])):
            raise UserError(f"{option(k)} must be {'positive integers' if isinstance(v, (list, tuple)) else 'a positive integer'}, got {v!r}")
        if k in NON_NEGATIVE and not (isinstance(v, int) and v >= 0):
            raise UserError(f"{option(k)} must be an integer >= 0, got {v!r}")
        if k in RANGES and isinstance(v, (int, float)):
            lo, hi, hi_ok = RANGES[k]
            if not (lo <= v and (v <= hi if hi_ok else v < hi)):  # NaN fails every comparison
                raise UserError(f"{option(k)} must be in [{lo:g}, {hi:g}{']' if hi_ok else ')'}, got {v!r}")


def optimiser_step(loss, opt, sched=None, clip=None, max_norm: float = 1.0) -> float | None:
    """One update from `loss`: clear the gradients, backpropagate, clip the gradient norm of the parameters `clip`
    (None: no clipping) at `max_norm`, step the optimiser and then the learning-rate schedule (if any). Returns the
    gradient norm before clipping (None without clipping). Every trainer's update, written once."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(clip, max_norm)) if clip is not None else None
    opt.step()
    if sched is not None:
        sched.step()
    return gnorm


class Progress:
    """A tqdm bar over the training steps and, every `every` steps (and at the last), one metrics.jsonl line with
    the interval's images/s. `show` names the metrics also shown on the bar. Without a run folder (a DDP rank
    other than 0) it shows and writes nothing."""

    def __init__(self, run: RunDir | None, total: int, initial: int = 0, every: int = 20, show: tuple = ("loss",)):
        self.run, self.total, self.every, self.show = run, total, every, show
        # into a file (nohup ... > run.out) a bar redraw is a line of text: one every 30 s, not ten a second
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=run is None,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)
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
        self.bar.set_postfix(**{k: f"{values[k]:.4g}" for k in self.show if k in values}, img_s=f"{rate:.0f}",
                             refresh=self.bar.mininterval < 1)  # a file gets the bar on its own clock
        self.run.metrics(step=step, **values, images_per_sec=rate)
        self.t_last, self.seen = time.time(), 0

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


class Interruption:
    """SIGTERM (a scheduler's preemption, `kill`, `pkill -f`) or Ctrl-C during a training loop, turned into a request
    the loop reads once per step: it checkpoints, saves what it has and exits, so that a stop costs no steps
    (without this it would lose everything since the last --save-every). A second signal stops at once
    (KeyboardInterrupt). Used as a context manager around the loop; outside the main thread, or in a process forked
    from it (a DataLoader worker, which the same `pkill -f` reaches), the default behaviour stands.

        with Interruption() as stop:
            while step < steps:
                ...
                if stop.requested:
                    checkpoint(); break
        sys.exit(stop.exit_code)  # 128 + the signal's number, as a shell reports a killed process; 0 if none came
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._pid, self._previous = os.getpid(), {}

    def __enter__(self) -> "Interruption":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0
