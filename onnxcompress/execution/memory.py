"""Freed memory kept for the next weight in the processes that run per-weight tasks (glibc only).

A per-weight task allocates and frees buffers of tens to hundreds of MB (a 2048x2048 weight's sorted
channels, prefix sums and codes). glibc serves a buffer above its mmap threshold (which it raises by
itself to at most 32 MB) by a fresh mmap and unmaps it on free, so the next weight's buffer of the
same size is faulted in again, a page at a time: measured, 0.07-0.3 s of system time per 2048x2048
weight of `share` without data, against 0.55 s of user time. With both the mmap threshold and the
trim threshold raised, freed buffers stay in the heap for the next task: the same weight's system
time is 0.00-0.02 s. The price is that a process keeps up to TRIM_BYTES of freed memory until it
exits, so its resident size stays near the largest task's peak.

:func:`keep_freed_memory` is called by the CLI (the process is the tool's), in the worker processes of
``--jobs N`` and in Ray tasks; a program using the Python API with ``jobs=1`` keeps its own malloc
settings unless it calls it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

MMAP_BYTES = 256 << 20  # buffers up to this size come from the heap (glibc's own threshold reaches 32 MB)
TRIM_BYTES = 512 << 20  # freed memory the heap keeps before it gives any back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once; True where they were set (glibc), False
    elsewhere (another C library, another platform), where nothing changes."""
    global _done
    if _done is None:
        _done = _set_thresholds()
        log.debug("malloc thresholds %s", "raised" if _done else "left as they are (not glibc)")
    return _done


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
