import platform
import subprocess
import sys
from pathlib import Path

import pytest

from python.core.memory import keep_freed_memory

PROBE = """
import sys
import numpy as np
from pathlib import Path
from python.core.memory import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory(), file=sys.stderr)
rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096 >> 20  # MiB
before = rss()
a = np.ones(256 << 20, np.uint8)  # 256 MiB, touched
del a
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_only_after_the_call():
    def retained(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        return int(out.stdout)

    assert retained("default") < 64  # glibc unmaps a freed 256 MiB block at once
    assert retained("keep") > 200    # with the thresholds raised it stays in the process for the next batch
    first = keep_freed_memory()
    assert first.startswith("glibc: freed memory kept") and keep_freed_memory() == first
