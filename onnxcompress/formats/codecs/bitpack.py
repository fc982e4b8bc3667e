"""Fixed-width bit packing of unsigned integers.

Math: value ``v[i]`` (``0 <= v[i] < 2**bits``) occupies stream bits ``[i*bits, (i+1)*bits)``;
bit ``j`` of the value (weight ``2**j``) is stream bit ``i*bits + j``, and stream bit ``t`` is
bit ``t % 8`` (weight ``2**(t % 8)``) of byte ``t // 8`` (little-endian bit order, as
``np.packbits(..., bitorder="little")``). The stream is ``ceil(n*bits/8)`` bytes; unused high
bits of the last byte are zero. Fully vectorized, no Python loop per value: writing adds
each shifted value into the 32-bit words it spans (:func:`write_bits`), reading gathers a
64-bit window per value from :func:`word_pairs` and shifts and masks it.
"""
from __future__ import annotations

import numpy as np

from onnxcompress.errors import CodecError

__all__ = ["pack", "unpack", "packed_size", "uint_dtype", "write_bits", "word_pairs"]


def uint_dtype(bits: int) -> np.dtype:
    """Smallest unsigned dtype holding ``bits``-bit values (uint8/16/32/64)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if bits <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def packed_size(count: int, bits: int) -> int:
    """Bytes used by ``count`` values of ``bits`` bits: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``values`` (each ``< 2**bits``) at ``bits`` bits each, LSB first.

    Raises ValueError for ``bits`` outside 1..32, non-integer, negative or too-large values
    (a programmer error, not a corrupt stream).
    """
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an int in 1..32, got {bits!r}")
    v = np.asarray(values).ravel()
    if v.size == 0:
        return b""
    if v.dtype.kind not in "iub":
        raise ValueError(f"pack needs integer values, got dtype {v.dtype}")
    if v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("pack needs nonnegative values")
    if int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    if bits in (8, 16, 32):
        return v.astype(f"<u{bits // 8}").tobytes()
    starts = np.arange(v.size, dtype=np.int64) * bits
    return write_bits(v, starts, v.size * bits)


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: read ``count`` values of ``bits`` bits from ``data``.

    Returns the smallest unsigned dtype holding ``bits``. Raises CodecError if ``bits`` or
    ``count`` are invalid or ``data`` holds fewer than ``ceil(count*bits/8)`` bytes (extra
    trailing bytes are ignored; callers that own the framing check exact sizes).
    """
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise CodecError(f"bit width {bits!r} is outside 1..32; the stream header is corrupt.")
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise CodecError(f"value count {count!r} is invalid; the stream header is corrupt.")
    need = packed_size(count, bits)
    if len(data) < need:
        raise CodecError(
            f"bit-packed data is truncated: {count} values of {bits} bits need {need} bytes, "
            f"got {len(data)}.")
    out_dtype = uint_dtype(bits)
    if count == 0:
        return np.zeros(0, out_dtype)
    if bits in (8, 16, 32):
        return np.frombuffer(data, f"<u{bits // 8}", count=count).astype(out_dtype)
    u = word_pairs(bytes(data[:need]), 2)
    pos = np.arange(count, dtype=np.uint64) * np.uint64(bits)
    window = u[pos >> np.uint64(5)] >> (pos & np.uint64(31))
    return (window & np.uint64((1 << bits) - 1)).astype(out_dtype)


def write_bits(codes: np.ndarray, starts: np.ndarray, total_bits: int) -> bytes:
    """Bit stream of ``ceil(total_bits/8)`` bytes with ``codes[i]`` (< 2**32, LSB first) at
    stream bit ``starts[i]``; the ranges must not overlap.

    ``v = code << (start & 31)`` (< 2**63) spans 32-bit words ``start >> 5`` (``v mod 2**32``)
    and the next (``v >> 32``). Codes never share bits, so OR equals ADD and every word is a
    ``bincount`` sum, exact in float64 because each word sum is < 2**32.
    """
    nwords = total_bits // 32 + 2
    v = np.asarray(codes).astype(np.uint64) << (np.asarray(starts).astype(np.uint64)
                                                 & np.uint64(31))
    word = (np.asarray(starts) >> 5).astype(np.int64)
    lo = np.bincount(word, weights=(v & np.uint64(0xFFFFFFFF)).astype(np.float64),
                     minlength=nwords)
    hi = np.bincount(word + 1, weights=(v >> np.uint64(32)).astype(np.float64),
                     minlength=nwords)
    return (lo + hi).astype(np.uint32).astype("<u4").tobytes()[: (total_bits + 7) // 8]


def word_pairs(data: bytes, pad_words: int) -> np.ndarray:
    """``u[j] = w[j] | w[j+1] << 32`` over the little-endian 32-bit words ``w`` of ``data``
    followed by ``pad_words`` zero words, so that the ``k <= 32`` bits at stream position
    ``p`` are ``(u[p >> 5] >> (p & 31)) & (2**k - 1)`` for any ``p < 8*len(data)``."""
    buf = np.zeros(-(-len(data) // 4) + pad_words + 1, np.uint32)
    buf.view(np.uint8)[:len(data)] = np.frombuffer(data, np.uint8)
    w = buf.astype("<u4", copy=False).astype(np.uint64)
    return w[:-1] | (w[1:] << np.uint64(32))
