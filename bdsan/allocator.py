"""Keep freed CPU memory for reuse: glibc's malloc settings for a process that allocates large tensors in a loop."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

# mallopt(3) parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int
_TOP_PAD = 256 * 2**20  # grow the heap in steps of at least this (address space; pages are touched on use)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed ones, instead of an mmap/munmap per tensor.

    PyTorch's CPU tensors come from malloc; glibc serves blocks over its mmap threshold with mmap and returns them on
    free, so each batch of a long loop faults its pages in again. In ``bdsan demo`` on a 2-core AMD EPYC that was
    13 M page faults and 41 s of system time in an 81 s run; with these settings 0.5 M, 4 s and 57 s (BENCHMARKS.md,
    "CPU memory allocator"). The cost: freed memory stays with the process until it exits (peak 1.8 → 2.4 GB there).
    Returns whether the settings were applied: not on other C libraries or systems, not with
    ``BDSAN_KEEP_FREED_MEMORY=0``, and not when the user set any ``MALLOC_*`` variable or a glibc malloc tunable
    (theirs win)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":  # musl's mallopt does nothing
        return False
    if os.environ.get("BDSAN_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no"):
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, _LARGEST), (_M_TRIM_THRESHOLD, _LARGEST), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
