"""Pick the smallest entropy coding of a symbol stream, tagged and checksummed.

Tagged stream: ``tag (u8) | method stream | CRC32 of tag + method stream (u32 LE)``, tags
``raw = 0``, ``huffman = 1``, ``ans = 2``. Any single bit flip or truncation is caught by the
CRC (or the length checks) in :func:`decode_any` and raised as CodecError.
"""
from __future__ import annotations

import zlib

import numpy as np

from onnxcompress.formats.codecs import ans, huffman, raw
from onnxcompress.formats.codecs._wire import declared_count as _declared_count
from onnxcompress.errors import CodecError

__all__ = ["METHODS", "entropy_bits", "encode", "encode_best", "decode_any", "declared_count", "estimated_ans_size"]

METHODS = ("raw", "huffman", "ans")
_CODECS = {"raw": raw, "huffman": huffman, "ans": ans}
_TAGS = {name: i for i, name in enumerate(METHODS)}


def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical entropy ``H = -sum_s p_s log2 p_s`` in bits per symbol, ``p_s = c_s / n``
    (0.0 for an empty or constant stream): the limit for any memoryless coder."""
    s = np.asarray(symbols).ravel()
    if s.size == 0:
        return 0.0
    if s.dtype.kind in "uib" and int(s.min()) >= 0 and int(s.max()) < max(1 << 16, s.size):  # counts, no sort
        counts = np.bincount(s)
        counts = counts[counts > 0]
    else:
        _, counts = np.unique(s, return_counts=True)
    p = counts / s.size
    return float(max(0.0, -(p * np.log2(p)).sum()))


def encode(method: str, symbols: np.ndarray, alphabet_size: int | None = None) -> bytes:
    """Encode with a forced ``method`` (one of :data:`METHODS`) into a tagged stream."""
    if method not in _TAGS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    body = bytes([_TAGS[method]]) + _CODECS[method].encode(symbols, alphabet_size)
    return body + zlib.crc32(body).to_bytes(4, "little")


def estimated_ans_size(counts: np.ndarray) -> int:
    """Bytes of ``encode("ans", ...)``'s tagged stream (tag, body, CRC) for symbols with these counts per
    symbol of the alphabet, without coding (:func:`ans.estimated_size`: exact or 4 bytes above)."""
    return 1 + ans.estimated_size(counts) + 4


def encode_best(symbols: np.ndarray, alphabet_size: int | None = None,
                methods=METHODS) -> tuple[str, bytes]:
    """Encode with each of ``methods`` and return ``(method, tagged bytes)`` of the smallest
    (earlier methods win ties). A method whose package is missing (ANS without constriction)
    is skipped unless it is the only one asked for."""
    best: tuple[str, bytes] | None = None
    missing: CodecError | None = None
    for method in methods:
        try:
            data = encode(method, symbols, alphabet_size)
        except CodecError as e:
            missing = e
            continue
        if best is None or len(data) < len(best[1]):
            best = (method, data)
    if best is None:
        if missing is not None:
            raise missing
        raise ValueError("methods is empty")
    return best


def _checked_body(data: bytes) -> bytes:
    """The method stream inside a tagged stream, after the length, CRC and tag checks."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"a tagged stream must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) < 5:
        raise CodecError(f"tagged stream is truncated: {len(data)} bytes, need at least 5.")
    body, crc = data[:-4], int.from_bytes(data[-4:], "little")
    if zlib.crc32(body) != crc:
        raise CodecError("tagged stream is corrupt or truncated: its CRC32 does not match.")
    tag = body[0]
    if tag >= len(METHODS):
        raise CodecError(f"tagged stream has unknown method tag {tag}; "
                         "it was written by a newer onnxcompress.")
    return body


def declared_count(data: bytes) -> int:
    """The symbol count a tagged stream declares, without decoding it (CodecError if corrupt)."""
    body = _checked_body(data)
    return _declared_count(body[1:], f"{METHODS[body[0]]} stream")


def decode_any(data: bytes) -> np.ndarray:
    """Decode a tagged stream from :func:`encode` or :func:`encode_best`."""
    body = _checked_body(data)
    return _CODECS[METHODS[body[0]]].decode(body[1:])
