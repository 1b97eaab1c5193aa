"""glibc malloc settings for a serving process: keep freed tensor memory for the next request.

A forward pass allocates and frees tens of megabytes of tensors. By default glibc serves
large blocks with ``mmap`` and unmaps them on ``free`` (its threshold adapts from
128 KiB up to 32 MiB), and gives the top of its heaps back to the kernel once 128 KiB
there are free. Every request then maps fresh pages and the kernel zeroes them: about
3,800 page faults per image for the demo detector. With both thresholds raised, freed
tensors stay in the heap for the next request: about 20 faults per image, and a forward
pass about 10 % faster on this project's 2-core machine (benchmarks/README.md). The
price is that the process keeps its peak working set instead of handing it back between
requests, as jemalloc and tcmalloc (which PyTorch's CPU performance guides recommend)
also do.

Only glibc has these settings (``mallopt``); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process.

    Args:
        mmap_threshold: blocks at least this large are mapped on their own (glibc documents
            32 MiB as the largest on 64-bit systems).
        trim_threshold: free memory at the top of a heap kept before it is returned.

    Returns:
        Whether both settings took effect (False off glibc, or if glibc refused one).

    Raises:
        ValueError: a threshold < 0.
    """
    if mmap_threshold < 0 or trim_threshold < 0:
        raise ValueError(f"thresholds must be >= 0, got {mmap_threshold} and {trim_threshold}")
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    logger.debug("malloc mmap threshold %d, trim threshold %d: %s", mmap_threshold, trim_threshold, ok)
    return ok
