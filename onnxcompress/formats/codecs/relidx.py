"""Sparse storage with relative indices and filler zeros (Deep Compression §2, Fig. 2).

Math. Let ``p_1 < p_2 < ...`` be the positions of the nonzero codes (code 0 = pruned) and
``p_0 = -1``. Each stored entry has a gap ``d = p_j - p_{j-1} >= 1`` that must fit in
``b = index_bits`` bits as the *stored value* ``d - 1`` in ``[0, 2**b - 1]``, i.e.
``1 <= d <= M = 2**b``. When ``d > M`` the encoder first emits ``f = (d - 1) // M`` filler
entries, each with gap ``M`` and value 0 (a zero stored at the max jump, exactly as the paper),
then the real entry with gap ``d - f*M`` in ``[1, M]``. Decoding places ``values`` at
positions ``cumsum(gaps) - 1``; fillers write zeros. Positions after the last stored entry are
zero (the dense ``length`` is known to the caller). Total cost for value width ``v`` bits:
``(b + v) * sum_j ((d_j - 1) // 2**b + 1)``.

To write gaps into a bit stream: ``bitpack.pack(gaps - 1, index_bits)``.
"""
from __future__ import annotations

import numpy as np

from onnxcompress.errors import CodecError
from onnxcompress.numerics.limits import check_elements

__all__ = ["encode", "decode", "entry_count", "total_bits", "best_index_bits"]


def _gaps(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(codes).ravel()
    pos = np.flatnonzero(c)
    d = np.diff(pos, prepend=-1)
    return pos, d


def encode(codes: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative-index form of the flat ``codes`` (0 = pruned).

    Returns ``(gaps, values)``: ``gaps`` (uint32, each in ``1 .. 2**index_bits``) and
    ``values`` (dtype of ``codes``; 0 for filler entries). Vectorized with repeat/cumsum.
    """
    if not isinstance(index_bits, (int, np.integer)) or not 1 <= index_bits <= 16:
        raise ValueError(f"index_bits must be an int in 1..16, got {index_bits!r}")
    c = np.asarray(codes).ravel()
    pos, d = _gaps(c)
    m = 1 << index_bits
    fillers = (d - 1) // m
    per_entry = fillers + 1
    real = np.cumsum(per_entry) - 1  # index of each real entry in the output
    gaps = np.full(int(per_entry.sum()), m, np.uint32)
    gaps[real] = d - fillers * m
    values = np.zeros(gaps.size, c.dtype)
    values[real] = c[pos]
    return gaps, values


def decode(gaps: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
    """Dense array of ``length`` codes from ``(gaps, values)``; inverse of :func:`encode`.

    Raises CodecError when the arrays differ in size, a gap is < 1, or the entries run past
    ``length``.
    """
    g = np.asarray(gaps).ravel()
    v = np.asarray(values).ravel()
    if g.size != v.size:
        raise CodecError(f"relative index stream has {g.size} gaps but {v.size} values.")
    if length < 0:
        raise CodecError(f"dense length {length} is negative.")
    check_elements(int(length), "a relative-index stream's dense length", CodecError)
    if g.size > length:
        raise CodecError(f"relative index stream has {g.size} entries for a dense length of {length}.")
    out = np.zeros(int(length), v.dtype)
    if g.size == 0:
        return out
    if g.dtype.kind not in "iu" or g.min() < 1:
        raise CodecError("relative index stream has a gap below 1 (corrupt indices).")
    pos = np.cumsum(g.astype(np.int64)) - 1
    if pos[-1] >= length:
        raise CodecError(
            f"relative indices reach position {int(pos[-1])} beyond the length {length}.")
    out[pos] = v
    return out


def entry_count(codes: np.ndarray, index_bits: int) -> int:
    """Stored entries (real + filler) for ``codes`` at ``index_bits``:
    ``sum_j ((d_j - 1) // 2**index_bits + 1)``."""
    _, d = _gaps(codes)
    return int(((d - 1) >> index_bits).sum() + d.size)


def total_bits(codes: np.ndarray, index_bits: int, value_bits: int) -> int:
    """Bits of the relative-index form: ``entry_count * (index_bits + value_bits)``."""
    return entry_count(codes, index_bits) * (index_bits + value_bits)


def best_index_bits(codes: np.ndarray, value_bits: int,
                    candidates=range(1, 17)) -> int:
    """The ``index_bits`` among ``candidates`` minimizing :func:`total_bits` (smallest wins
    ties)."""
    _, d = _gaps(codes)
    best = None
    for b in candidates:
        bits = (int(((d - 1) >> b).sum()) + d.size) * (b + value_bits)
        if best is None or bits < best[0]:
            best = (bits, b)
    if best is None:
        raise ValueError("candidates is empty")
    return best[1]
