"""Bounds on what a declaration may make us allocate.

A stream header, a packed blob, an .npy header or a declared input shape states a size; the bytes
behind it may not back it (a 14-byte stream can declare 2**32 symbols). Every such size is checked
here against these limits, and by its reader against the bytes present, before any allocation.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: Largest tensor, in elements, a declaration may make us allocate: 2**28 (1 GiB as float32).
#: Larger than any single weight of the models onnxcompress targets (VGG-19's fc6 holds 2**26.6).
MAX_TENSOR_ELEMENTS = 1 << 28
#: Largest feed we synthesize when no data is given, in elements over all inputs of one feed (8 feeds):
#: 2**23 (32 MiB as float32); a 3x224x224 image is 2**17.2, a 16-frame clip of them 2**21.2.
MAX_SYNTH_ELEMENTS = 1 << 23


def element_count(shape: Iterable[int]) -> int:
    """Exact product of `shape` (Python ints: no int64 overflow)."""
    count = 1
    for d in shape:
        count *= int(d)
    return count


def check_elements(count: int, what: str, error: type[Exception], limit: int = MAX_TENSOR_ELEMENTS) -> int:
    """`count` if it is at most `limit`, else `error` naming `what` declared it."""
    if count > limit:
        raise error(f"{what} declares {count} elements, more than the {limit} onnxcompress allocates "
                    "(a corrupt or hostile size)")
    return count


def nbytes(count: int, dtype) -> int:
    return int(count) * np.dtype(dtype).itemsize
