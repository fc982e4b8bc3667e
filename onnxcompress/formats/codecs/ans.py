"""Asymmetric numeral systems (rANS) entropy coding via ``constriction``'s Rust coder.

Math. With stored integer frequencies ``f_i >= 1`` over the ``k`` used symbols, the model is
``q_i = f_i / sum_j f_j`` (constriction quantizes it to its 24-bit fixed point, identically in
encoder and decoder because both build ``Categorical(f, perfect=False)`` from the same ints).
The payload costs ``~ -sum_i c_i log2 q_i`` bits for counts ``c_i``, i.e. the entropy plus
``n * KL(p || q)``. The frequencies are the counts rescaled to ``q`` bits,
``f_i = clip(round(c_i * 2**q / max c), 1, 2**q)``, with ``q`` in 1..16 chosen to minimize
header bits ``k * q`` plus the estimated payload bits.

Stream (ints are LEB128 varints)::

    n, alphabet_size
    n == 0: nothing more
    symbol set (see _wire.write_symbol_set): k distinct symbols
    k == 1: nothing more
    k >= 2: q (u8), f_i - 1 (k x q bits, packed), word count w, payload: w little-endian u32
"""
from __future__ import annotations

import numpy as np

from onnxcompress.formats.codecs import _wire
from onnxcompress.formats.codecs._wire import uvarint
from onnxcompress.formats.codecs.bitpack import pack
from onnxcompress.errors import CodecError

__all__ = ["encode", "decode", "quantize_counts", "estimated_size"]

_FREQ_BITS = range(1, 17)
_CHUNK = 1 << 20  # symbols decoded per call


def _constriction():
    try:
        import constriction
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CodecError("ANS coding needs the constriction package: "
                         "pip install constriction (or onnxcompress[packed]).") from e
    return constriction


def quantize_counts(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """Choose the frequency precision ``q`` and frequencies ``f`` for positive ``counts``.

    ``f_i = clip(round(c_i * 2**q / max(c)), 1, 2**q)``; ``q`` minimizes
    ``k*q + sum_i c_i * log2(sum(f) / f_i)`` (header plus estimated payload bits).
    Returns ``(q, f)`` with ``f`` int64.
    """
    c = np.asarray(counts, np.float64)
    best = None
    for q in _FREQ_BITS:
        f = np.clip(np.rint(c * (1 << q) / c.max()), 1, 1 << q).astype(np.int64)
        cost = c.size * q + float((c * np.log2(f.sum() / f)).sum())
        if best is None or cost < best[0]:
            best = (cost, q, f)
    return best[1], best[2]


def _model(freqs: np.ndarray):
    c = _constriction()
    return c.stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def encode(symbols: np.ndarray, alphabet_size: int | None = None) -> bytes:
    """ANS-encode nonnegative int ``symbols`` (< ``alphabet_size``) into a self-describing
    stream (format in the module docstring)."""
    s, alphabet_size = _wire.check_symbols(symbols, alphabet_size)
    head, counts, used, complete = _wire.write_header(s, alphabet_size)
    if complete:
        return head
    q, freqs = quantize_counts(counts[used])
    index = np.zeros(alphabet_size, np.int32)
    index[used] = np.arange(used.size, dtype=np.int32)
    coder = _constriction().stream.stack.AnsCoder()
    coder.encode_reverse(index[s], _model(freqs))
    words = np.asarray(coder.get_compressed(), dtype="<u4")
    return b"".join([head, bytes([q]), pack(freqs - 1, q), uvarint(words.size),
                     words.tobytes()])


def estimated_size(counts: np.ndarray) -> int:
    """Bytes of :func:`encode`'s stream for symbols with these `counts` (one per symbol of the alphabet,
    ``len(counts)`` its size), without coding: the header, symbol set and frequencies exactly, the
    payload from the model's cost ``sum_i c_i log2(sum f / f_i)`` bits as ``ceil(bits / 32) + 1``
    words. The coder's own payload is that many words or one fewer (its final state flush), so the
    estimate is exact or 4 bytes above (tests/test_codecs.py)."""
    c = np.asarray(counts, np.int64).ravel()
    n, used = int(c.sum()), np.flatnonzero(c)
    head = uvarint(n) + uvarint(c.size)
    if n == 0:
        return len(head)
    head += _wire.write_symbol_set(used, c.size)
    if used.size == 1:
        return len(head)
    q, freqs = quantize_counts(c[used])
    bits = float((c[used] * np.log2(freqs.sum() / freqs)).sum())
    words = int(np.ceil(bits / 32)) + 1
    return len(head) + 1 + (used.size * q + 7) // 8 + len(uvarint(words)) + 4 * words


def decode(data: bytes) -> np.ndarray:
    """Decode a stream written by :func:`encode`; returns the smallest uint dtype holding
    the alphabet. Raises CodecError on truncation or when the coder does not end empty."""
    r, n, dtype, used, decoded = _wire.read_header(data, "ANS stream")
    if decoded is not None:
        return decoded
    q = r.u8("frequency precision")
    if not 1 <= q <= 16:
        raise r.fail(f"frequency precision {q} is outside 1..16")
    freqs = r.packed(used.size, q, "frequencies").astype(np.int64) + 1
    words = r.varint("payload word count", r.remaining // 4)
    payload = np.frombuffer(r.take(4 * words, "payload"), "<u4").astype(np.uint32)
    r.done()
    # each symbol costs at least -log2(max q_i) bits; bound n by what the payload can hold
    p_max = freqs.max() / freqs.sum()
    min_bits = -np.log2(p_max) if p_max < 1 else 0.0
    if n * min_bits > 32 * words + 64:
        raise r.fail(f"{n} symbols cannot fit in {words} payload words")
    model = _model(freqs)
    c = _constriction()
    symbols = used.astype(dtype)
    out = np.empty(n, dtype)  # filled by chunks: the coder's int32 indices never exist all at once
    try:
        coder = c.stream.stack.AnsCoder(payload)
        for start in range(0, n, _CHUNK):
            index = np.asarray(coder.decode(model, min(_CHUNK, n - start)))
            if index.size != min(_CHUNK, n - start) or (index.size and (index.min() < 0
                                                                         or index.max() >= used.size)):
                raise r.fail("the ANS payload decoded to symbols outside the model")
            out[start:start + index.size] = symbols[index]
        ok = coder.is_empty()
    except CodecError:
        raise
    except Exception as e:  # constriction rejects some invalid states itself
        raise r.fail(f"the ANS payload is invalid ({e})") from e
    if not ok:
        raise r.fail("the ANS coder did not end empty after decoding all symbols")
    return out
