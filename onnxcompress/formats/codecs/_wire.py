"""Internal byte-level helpers shared by the codecs: varints, a bounds-checked reader,
symbol-set serialization and input validation. Not part of the public API."""
from __future__ import annotations

import numpy as np

from onnxcompress.errors import CodecError
from onnxcompress.formats.codecs.bitpack import pack, unpack, packed_size
from onnxcompress.numerics.limits import MAX_TENSOR_ELEMENTS

#: Largest alphabet any entropy codec accepts (symbols are < 2**24).
MAX_ALPHABET = 1 << 24
#: Largest symbol count a stream header may declare (guards allocation on corrupt input): the
#: largest tensor onnxcompress allocates from a declaration (onnxcompress.numerics.limits).
MAX_SYMBOLS = MAX_TENSOR_ELEMENTS


def uvarint(n: int) -> bytes:
    """LEB128 encoding of a nonnegative int: 7 bits a byte, high bit = more bytes follow."""
    if n < 0:
        raise ValueError(f"varint needs a nonnegative int, got {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Reader:
    """Sequential reader over ``data`` whose every read is checked against the bytes left."""

    def __init__(self, data: bytes, what: str):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"{what} must be bytes, got {type(data).__name__}.")
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def fail(self, msg: str) -> CodecError:
        return CodecError(f"corrupt {self.what}: {msg}.")

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or n > self.remaining:
            raise self.fail(f"{field} needs {n} bytes but only {self.remaining} remain "
                            "(truncated stream)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def varint(self, field: str, limit: int) -> int:
        """Read a LEB128 int and check ``0 <= value <= limit``."""
        value, shift = 0, 0
        while True:
            if self.remaining <= 0:
                raise self.fail(f"{field} is cut off (truncated stream)")
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 63:
                raise self.fail(f"{field} is an overlong varint")
        if value > limit:
            raise self.fail(f"{field} = {value} exceeds the limit {limit}")
        return value

    def packed(self, count: int, bits: int, field: str) -> np.ndarray:
        return unpack(self.take(packed_size(count, bits), field), bits, count)

    def done(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected trailing bytes")


def bit_length(x: int) -> int:
    """Bits needed to write integers in ``[0, x]`` (at least 1)."""
    return max(1, int(x).bit_length())


def symbol_dtype(alphabet_size: int) -> np.dtype:
    """Smallest unsigned dtype holding symbols ``0 .. alphabet_size - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if alphabet_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def check_symbols(symbols, alphabet_size: int | None) -> tuple[np.ndarray, int]:
    """Validate an encoder's input: a flat array of ints in ``[0, alphabet_size)``.

    Returns ``(symbols as int64, alphabet_size)``; ``alphabet_size`` defaults to ``max + 1``
    (0 for an empty stream). Raises ValueError on bad input (a programmer error).
    """
    s = np.asarray(symbols)
    if s.size and s.dtype.kind not in "iub":
        raise ValueError(f"symbols must be integers, got dtype {s.dtype}")
    s = s.astype(np.int64, copy=False).ravel()
    if s.size and int(s.min()) < 0:
        raise ValueError("symbols must be nonnegative")
    top = int(s.max()) + 1 if s.size else 0
    if alphabet_size is None:
        alphabet_size = top
    alphabet_size = int(alphabet_size)
    if top > alphabet_size:
        raise ValueError(f"symbol {top - 1} is outside the alphabet of size {alphabet_size}")
    if alphabet_size > MAX_ALPHABET:
        raise ValueError(f"alphabet size {alphabet_size} exceeds {MAX_ALPHABET}")
    if s.size > MAX_SYMBOLS:
        raise ValueError(f"{s.size} symbols exceed the limit {MAX_SYMBOLS}")
    return s, alphabet_size


def write_symbol_set(used: np.ndarray, alphabet_size: int) -> bytes:
    """Serialize a sorted set of distinct symbols: the shorter of a bitmap (mode 0,
    ``ceil(A/8)`` bytes) and a list (mode 1: varint k, then k symbols bit-packed at
    ``bit_length(A-1)`` bits)."""
    bitmap_len = (alphabet_size + 7) // 8
    sbits = bit_length(alphabet_size - 1)
    list_len = len(uvarint(len(used))) + packed_size(len(used), sbits)
    if bitmap_len <= list_len:
        flags = np.zeros(alphabet_size, np.uint8)
        flags[used] = 1
        return b"\x00" + np.packbits(flags, bitorder="little").tobytes()
    return b"\x01" + uvarint(len(used)) + pack(used, sbits)


def read_symbol_set(r: Reader, alphabet_size: int) -> np.ndarray:
    """Inverse of :func:`write_symbol_set`; returns the sorted symbols as int64."""
    mode = r.u8("symbol-set mode")
    if mode == 0:
        raw = np.frombuffer(r.take((alphabet_size + 7) // 8, "symbol bitmap"), np.uint8)
        flags = np.unpackbits(raw, bitorder="little")
        if flags[alphabet_size:].any():
            raise r.fail("symbol bitmap has bits set beyond the alphabet")
        return np.flatnonzero(flags[:alphabet_size]).astype(np.int64)
    if mode == 1:
        k = r.varint("distinct-symbol count", alphabet_size)
        used = r.packed(k, bit_length(alphabet_size - 1), "symbol list").astype(np.int64)
        if k and (used[-1] >= alphabet_size or (np.diff(used) <= 0).any()):
            raise r.fail("symbol list is not strictly increasing inside the alphabet")
        return used
    raise r.fail(f"unknown symbol-set mode {mode}")


def declared_count(data: bytes, what: str) -> int:
    """The symbol count a Huffman, ANS or raw stream declares (its first varint), read without
    decoding, so that a caller can compare it with the size it expects before any allocation."""
    return Reader(data, what).varint("symbol count", MAX_SYMBOLS)


def read_header(data: bytes, what: str) -> tuple[Reader, int, np.dtype, np.ndarray, np.ndarray | None]:
    """Read the header Huffman and ANS streams share: symbol count n, alphabet size, symbols used.

    Returns (reader, n, dtype, used, decoded): `decoded` is the whole result for the streams that
    end with the header (no symbols, or one distinct symbol repeated n times), else None and the
    reader stands at the coder's own fields.
    """
    r = Reader(data, what)
    n = r.varint("symbol count", MAX_SYMBOLS)
    alphabet_size = r.varint("alphabet size", MAX_ALPHABET)
    dtype = symbol_dtype(alphabet_size)
    if n == 0:
        r.done()
        return r, n, dtype, np.zeros(0, np.int64), np.zeros(0, dtype)
    if alphabet_size == 0:
        raise r.fail("a nonempty stream declares an empty alphabet")
    used = read_symbol_set(r, alphabet_size)
    if used.size == 0:
        raise r.fail("a nonempty stream declares no symbols")
    if used.size == 1:
        r.done()
        return r, n, dtype, used, np.full(n, used[0], dtype)
    return r, n, dtype, used, None


def write_header(s: np.ndarray, alphabet_size: int) -> tuple[bytes, np.ndarray, np.ndarray, bool]:
    """The header Huffman and ANS streams share, the inverse of :func:`read_header`.

    Returns (header bytes, counts per symbol, symbols used, complete): `complete` is True for
    the streams the header says everything about (no symbols, or one distinct symbol).
    """
    head = uvarint(s.size) + uvarint(alphabet_size)
    if s.size == 0:
        return head, np.zeros(alphabet_size, np.int64), np.zeros(0, np.int64), True
    counts = np.bincount(s, minlength=alphabet_size)
    used = np.flatnonzero(counts)
    head += write_symbol_set(used, alphabet_size)
    return head, counts, used, used.size == 1
