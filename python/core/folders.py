"""Replacing a folder whole: what an export and a weights folder are written by, so that a reader sees the old one
or the new one, never a mix."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(new: Path, out: Path) -> None:
    """Put the finished folder `new` in the place of `out` (which may not exist) with renames only: at every moment
    `out` is either the old folder whole or the new one whole (between the two renames, briefly, absent)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
