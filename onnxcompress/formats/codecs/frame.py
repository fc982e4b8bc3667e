"""A container for named byte streams, each protected by a CRC32.

Layout (ints are LEB128 varints)::

    b"OXC1", version (u8 = 1), stream count,
    per stream: name length, UTF-8 name, data length, CRC32 of data (u32 LE),
    CRC32 of everything above (u32 LE),
    the stream data, concatenated in the same order.

``unpack_streams`` raises CodecError for a bad magic, an unknown version, truncation,
trailing bytes, a corrupt header or a CRC mismatch (naming the stream).
"""
from __future__ import annotations

import zlib

from onnxcompress.formats.codecs._wire import Reader, uvarint
from onnxcompress.errors import CodecError

__all__ = ["pack_streams", "framed_size", "unpack_streams", "MAGIC", "VERSION"]

MAGIC = b"OXC1"
VERSION = 1
_MAX_NAME = 1 << 16


def pack_streams(streams: dict[str, bytes]) -> bytes:
    """Serialize ``streams`` (name -> bytes, in insertion order) into one frame."""
    head = [MAGIC, bytes([VERSION]), uvarint(len(streams))]
    for name, data in streams.items():
        if not isinstance(name, str):
            raise ValueError(f"stream names must be str, got {type(name).__name__}")
        raw = name.encode("utf-8")
        if len(raw) > _MAX_NAME:
            raise ValueError(f"stream name longer than {_MAX_NAME} bytes")
        data = bytes(data)
        head += [uvarint(len(raw)), raw, uvarint(len(data)),
                 zlib.crc32(data).to_bytes(4, "little")]
    header = b"".join(head)
    return b"".join([header, zlib.crc32(header).to_bytes(4, "little"),
                     *(bytes(d) for d in streams.values())])


def framed_size(lengths: dict[str, int]) -> int:
    """len(pack_streams(streams)) for streams of these byte lengths (name -> length), without their data."""
    head = len(MAGIC) + 1 + len(uvarint(len(lengths)))
    for name, n in lengths.items():
        raw = len(name.encode("utf-8"))
        head += len(uvarint(raw)) + raw + len(uvarint(n)) + 4
    return head + 4 + sum(lengths.values())


def unpack_streams(data: bytes) -> dict[str, bytes]:
    """Inverse of :func:`pack_streams`."""
    r = Reader(data, "stream frame")
    if r.remaining < len(MAGIC) or r.take(len(MAGIC), "magic") != MAGIC:
        raise CodecError(f"not an onnxcompress stream frame: the magic {MAGIC!r} is missing.")
    version = r.u8("version")
    if version != VERSION:
        raise CodecError(f"stream frame version {version} is not supported (this onnxcompress "
                         f"reads version {VERSION}); upgrade onnxcompress.")
    count = r.varint("stream count", r.remaining)
    entries = []
    for i in range(count):
        name_len = r.varint(f"name length of stream #{i}", min(_MAX_NAME, r.remaining))
        raw = r.take(name_len, f"name of stream #{i}")
        length = r.varint(f"length of stream #{i}", r.remaining)
        crc = r.u32(f"CRC of stream #{i}")
        entries.append((raw, length, crc))
    header_end = r.pos
    if r.u32("header CRC") != zlib.crc32(r.data[:header_end]):
        raise CodecError("stream frame header is corrupt: its CRC32 does not match.")
    out: dict[str, bytes] = {}
    for raw, length, crc in entries:
        name = raw.decode("utf-8", errors="replace")
        body = r.take(length, f"data of stream '{name}'")
        if zlib.crc32(body) != crc:
            raise CodecError(f"stream '{name}' is corrupt: its CRC32 does not match.")
        if name in out:
            raise CodecError(f"stream frame holds two streams named '{name}'.")
        out[name] = body
    r.done()
    return out
