"""Fixed-width bit packing of unsigned integers.

Math: value ``v[i]`` (``0 <= v[i] < 2**bits``) occupies stream bits ``[i*bits, (i+1)*bits)``;
bit ``j`` of the value (weight ``2**j``) is stream bit ``i*bits + j``, and stream bit ``t`` is
bit ``t % 8`` (weight ``2**(t % 8)``) of byte ``t // 8`` (little-endian bit order, as
``np.packbits(..., bitorder="little")``). The stream is ``ceil(n*bits/8)`` bytes; unused high
bits of the last byte are zero. Fully vectorized: values are spread into a bit matrix with
``np.unpackbits`` and squeezed with ``np.packbits``; no Python loop per value.
"""
from __future__ import annotations

import numpy as np

from onnxcompress.errors import CodecError

__all__ = ["pack", "unpack", "packed_size", "uint_dtype"]


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
    as_bytes = v.astype("<u4").view(np.uint8).reshape(-1, 4)
    bit_matrix = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.ravel(), bitorder="little").tobytes()


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
    buf = np.frombuffer(data, np.uint8, count=need)
    if bits in (8, 16, 32):
        return buf.view(f"<u{bits // 8}").astype(out_dtype)
    stream_bits = np.unpackbits(buf, bitorder="little")[: count * bits].reshape(count, bits)
    width = out_dtype.itemsize * 8
    padded = np.zeros((count, width), np.uint8)
    padded[:, :bits] = stream_bits
    return np.packbits(padded, axis=1, bitorder="little").view(out_dtype.newbyteorder("<")) \
        .ravel().astype(out_dtype)
