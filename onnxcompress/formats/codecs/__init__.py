"""Codecs for the packed form: bit packing, Huffman, ANS, relative sparse indices, a
container for named streams, and the choice layer the entropy pass uses.

Every decoder raises :class:`onnxcompress.errors.CodecError` on corrupt or truncated input.
"""
from __future__ import annotations

from onnxcompress.formats.codecs import ans, bitpack, frame, huffman, raw, relidx
from onnxcompress.formats.codecs.bitpack import pack, unpack
from onnxcompress.formats.codecs.choice import METHODS, decode_any, encode, encode_best, entropy_bits
from onnxcompress.formats.codecs.frame import pack_streams, unpack_streams

__all__ = [
    "ans", "bitpack", "frame", "huffman", "raw", "relidx",
    "pack", "unpack", "pack_streams", "unpack_streams",
    "METHODS", "entropy_bits", "encode", "encode_best", "decode_any",
]
