"""Keep freed large blocks in the process (glibc malloc), so that a step's big tensors are not faulted in again.

glibc serves allocations above its mmap threshold (128 KiB, adaptive up to 32 MiB) straight from the kernel and
unmaps them on free. A pretraining step on a 128^3 patch allocates and frees tensors of 32 MiB and more several
times per step, and every one of them is page-faulted in again on the next step: 25-32 ms for a fresh 4x128^3
float tensor against 4 ms for a reused one (docs/BENCHMARKS.md, speed section). Raising the mmap and trim
thresholds makes malloc serve them from the heap and keep them there after free. It is the same as setting
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment, done from inside the process.

The cost is memory: the process keeps its peak heap instead of returning freed blocks to the system, as CUDA's
caching allocator does on a GPU. Training processes reach their peak on the first steps anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest value mallopt takes (an int); glibc caps the mmap threshold's own adaptation at 32 MiB, not this
KEEP_THRESHOLD_BYTES = 2 ** 31 - 1


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(threshold_bytes: int = KEEP_THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` for this process (and the processes it forks).

    Returns True if both were set, False where there is no glibc ``mallopt`` (macOS, Windows, musl): there the
    call does nothing and training is unchanged.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, int(threshold_bytes)) == 1
    return ok_mmap and ok_trim
