"""Keep freed memory in the process, so that batched inference does not pay the kernel for every batch's pages.

glibc's malloc serves each block above its mmap threshold (dynamic, at most 32 MB) with a fresh mmap and unmaps it
when it is freed. A batch of 256 images through the decoder allocates activations of 100+ MB per layer, so every
call faulted in new pages that the kernel zeroes first. Measured on the 2-core CPU (torch 2.14.1, 2 threads, the
shipped GAN path at batch 256, noise -> decoded images): torch eager 258 images/s as glibc ships, 272 with the
threshold at its 32 MB maximum, **376** with it at 1 GB and the trim threshold at its maximum (this helper);
ONNX Runtime, whose arena keeps its own memory, 342 -> 349. The price: the process keeps its peak memory until it
exits, instead of handing it back between batches. Training gained nothing measurable (2.63 vs 2.53 steps/s for
the student at batch 64), so only the inference entry points call it.

Pure ctypes, no torch: the runtime uses it too. On a C library other than glibc it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls return the first answer). Returns
    what was done, for logs and the bench's machine description: 'glibc: freed memory kept (mmap threshold 1024
    MiB, no trimming)' or why nothing was."""
    libc_name, _ = platform.libc_ver()
    if platform.system() != "Linux" or libc_name != "glibc":
        result = f"not glibc ({platform.system()} {libc_name or 'unknown libc'}): malloc left as it is"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD)) == 1 and
                  libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)) == 1)
        except (OSError, AttributeError):
            ok = False
        result = (f"glibc: freed memory kept (mmap threshold {MMAP_THRESHOLD >> 20} MiB, no trimming)" if ok
                  else "glibc refused mallopt: malloc left as it is")
    return result
