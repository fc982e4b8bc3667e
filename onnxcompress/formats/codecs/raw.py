"""Raw fixed-width coding: every symbol at ``bits = bit_length(alphabet_size - 1)`` bits.

Stream: varint n, varint alphabet_size, then ``ceil(n * bits / 8)`` bytes of bitpack.pack.
An alphabet of size 1 stores no payload.
"""
from __future__ import annotations

import numpy as np

from onnxcompress.formats.codecs import _wire
from onnxcompress.formats.codecs._wire import Reader, uvarint
from onnxcompress.formats.codecs.bitpack import pack, packed_size

__all__ = ["encode", "decode", "raw_bits"]


def raw_bits(alphabet_size: int) -> int:
    """Bits per symbol of the raw form: ``ceil(log2(alphabet_size))`` (0 for size <= 1)."""
    return max(0, int(alphabet_size - 1).bit_length())


def encode(symbols: np.ndarray, alphabet_size: int | None = None) -> bytes:
    """Bit-pack ``symbols`` at :func:`raw_bits` bits behind a small header."""
    s, alphabet_size = _wire.check_symbols(symbols, alphabet_size)
    bits = raw_bits(alphabet_size)
    head = uvarint(s.size) + uvarint(alphabet_size)
    return head + (pack(s, bits) if bits and s.size else b"")


def decode(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode`; CodecError on truncation or trailing bytes."""
    r = Reader(data, "raw stream")
    n = r.varint("symbol count", _wire.MAX_SYMBOLS)
    alphabet_size = r.varint("alphabet size", _wire.MAX_ALPHABET)
    dtype = _wire.symbol_dtype(alphabet_size)
    bits = raw_bits(alphabet_size)
    if n and alphabet_size == 0:
        raise r.fail("a nonempty stream declares an empty alphabet")
    if bits == 0:
        r.done()
        return np.zeros(n, dtype)
    if packed_size(n, bits) > r.remaining:
        raise r.fail(f"{n} symbols of {bits} bits need more than the {r.remaining} bytes left")
    out = r.packed(n, bits, "payload")
    r.done()
    if n and int(out.max()) >= alphabet_size:
        raise r.fail("a symbol lies outside the alphabet")
    return out.astype(dtype)
