"""Host memory for CPU training: keep what tensors free for the next step.

A training step frees and reallocates the same tensor sizes every step. With its
default settings glibc's ``malloc`` serves blocks above a (dynamic) threshold with
``mmap`` and hands them back to the OS when freed, and it trims the top of its heap
whenever enough is free there, so the next step faults those pages in again. On the
2-core VM of the README's figures a Glow training step (3x32x32, batch 32) took 20,000
to 64,000 page faults this way, and its convolutions ran ~20% slower than the same
convolutions alone, paying for the faults; with the settings below it took almost none,
and the convolutions ran as fast inside the flow as alone. :func:`reuse_freed_memory`
raises both thresholds, so freed memory stays in the process for reuse, as PyTorch's
CUDA caching allocator does on a GPU. The price: the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["reuse_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, whose freed blocks are reused
TRIM_THRESHOLD = 1 << 30  # the heap's top is returned to the OS only past 1 GiB free


def reuse_freed_memory() -> bool:
    """Sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` for this process; returns
    whether it could (``False`` off Linux or with another C library, where nothing changes).

    Call it once, early; it affects allocations made after it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
