"""Canonical, length-limited Huffman coding (Deep Compression §4) with a vectorized decoder.

Math. For symbol counts ``c_i > 0`` the code lengths ``l_i`` minimize ``sum_i c_i l_i``
subject to Kraft ``sum_i 2**-l_i <= 1`` and ``l_i <= max_len`` (package-merge, Larmore &
Hirschberg 1990); without a binding limit this equals Huffman's optimum, within 1 bit/symbol
of the entropy. Codes are canonical (DEFLATE order): sorted by (length, symbol), the first
code of length ``l`` is ``first[l] = (first[l-1] + n_{l-1}) << 1``. Bits are written LSB
first (see bitpack), so each code is stored bit-reversed: its first bit is the lowest.

Decoding. Symbols are cut into blocks of ``B`` symbols; the header stores where each block
starts in the bit stream. All blocks decode simultaneously: at each of the ``B`` steps, for
every block, the next ``L = max(l_i)`` bits at its position ``p`` are read as
``(u[p >> 5] >> (p & 31)) & (2**L - 1)`` from ``u[j] = word[j] | word[j+1] << 32`` and looked
up in a ``2**L`` table giving (symbol, length); ``p += length``. That is ``B`` numpy steps on
vectors of ``n / B`` elements. Each block must end exactly where the next begins.

Stream (all ints LEB128 varints unless stated)::

    n, alphabet_size
    n == 0: nothing more
    symbol set (see _wire.write_symbol_set): k distinct symbols
    k == 1: nothing more (a length-0 code; the stream is the count)
    k >= 2: code lengths (k x 5 bits, packed), B, total_bits,
            base, dbits (u8), block bit lengths minus base (nblocks x dbits, packed),
            payload: ceil(total_bits / 8) bytes
"""
from __future__ import annotations

import numpy as np

from onnxcompress.formats.codecs import _wire
from onnxcompress.formats.codecs._wire import bit_length, uvarint
from onnxcompress.formats.codecs.bitpack import pack, word_pairs, write_bits

__all__ = ["code_lengths", "canonical_codes", "auto_block_size", "encode", "decode",
           "MAX_CODE_LEN"]

#: Longest code a stream may declare (decoder table has 2**max_len entries).
MAX_CODE_LEN = 24
#: Default limit: a 2**16-entry decode table stays in L2 cache; vs. 20 bits it costs
#: ~0.0004 bit/symbol on 8-bit Laplace codes. Raised to ceil(log2 k) for k > 2**16 symbols.
DEFAULT_MAX_LEN = 16
_LEN_BITS = 5  # code lengths are stored in 5 bits each


def auto_block_size(n: int) -> int:
    """Symbols per decode block: ``2**round(log2(sqrt(n)))`` clipped to 32..1024.

    Decoding takes ``B`` numpy steps over ``n / B`` blocks each; a step has a fixed cost of a
    few microseconds, so steps over fewer lanes than there are steps waste time. With
    ``B ~ sqrt(n)`` every step covers about ``B`` blocks. The block index costs
    ``~(n / B) * (log2(B)/2 + 3)`` bits: 1.5% of a 21k-symbol stream at 2 bits per symbol,
    under 0.2% from 1M symbols on (B = 1024). Against the earlier ``sqrt(8 n)``, a 21k-symbol
    stream of 5-bit codes decoded 10x faster for 1.4% more bytes (``python
    benchmarks/bench_codecs.py``, last table).
    """
    b = int(round(np.log2(np.sqrt(max(n, 1)))))
    return 1 << min(max(b, 5), 10)


def code_lengths(counts: np.ndarray, max_len: int = DEFAULT_MAX_LEN) -> np.ndarray:
    """Optimal length-limited prefix-code lengths for ``counts`` (package-merge).

    ``lengths[i]`` minimizes ``sum_i counts[i] * lengths[i]`` subject to
    ``sum_{counts[i] > 0} 2**-lengths[i] == 1`` and ``lengths[i] <= max_len``; symbols with
    count 0 get length 0. A single used symbol gets length 0 (nothing to transmit).

    Package-merge: list ``L_max_len`` holds the leaves sorted by weight; ``L_{l}`` merges the
    leaves with the pairwise sums ("packages") of ``L_{l+1}``. Taking the ``2k - 2`` lightest
    items of ``L_1`` and expanding packages level by level, a leaf's code length is the number
    of levels in which it is selected; since leaves are sorted, the selected leaves at each
    level are a prefix, so lengths are sums of prefix indicators.
    """
    c = np.asarray(counts, dtype=np.int64).ravel()
    if c.size and c.min() < 0:
        raise ValueError("counts must be nonnegative")
    lengths = np.zeros(c.size, np.int64)
    used = np.flatnonzero(c)
    k = used.size
    if k <= 1:
        return lengths
    if not 1 <= max_len <= MAX_CODE_LEN or k > (1 << max_len):
        raise ValueError(f"{k} symbols cannot be coded with max_len={max_len}")
    order = used[np.argsort(c[used], kind="stable")]
    leaves = c[order]
    # build lists bottom-up: is_leaf flags of each merged list, deepest level first
    levels = []
    prev = leaves
    levels.append(np.ones(k, bool))
    for _ in range(max_len - 1):
        packages = prev[0:len(prev) - 1:2] + prev[1:len(prev):2]
        merged = np.concatenate([leaves, packages])
        idx = np.argsort(merged, kind="stable")  # ties: leaves first
        prev = merged[idx]
        levels.append(idx < k)
    # select top-down from L_1
    m = 2 * k - 2
    depth = np.zeros(k, np.int64)
    for is_leaf in reversed(levels):
        n_leaves = int(is_leaf[:m].sum())
        depth[:n_leaves] += 1
        m = 2 * (m - n_leaves)
        if m == 0:
            break
    lengths[order] = depth
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (MSB-first integers) for ``lengths`` (0 = unused -> code 0).

    Symbols sorted by (length, symbol) get consecutive codes; the first code of length ``l``
    is ``first[l] = (first[l-1] + count[l-1]) << 1`` with ``first[0] = 0, count[0] = 0``.
    """
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        return codes
    order = used[np.lexsort((used, lengths[used]))]
    top = int(lengths.max())
    count = np.bincount(lengths[used], minlength=top + 1)
    first = np.zeros(top + 1, np.int64)
    for l in range(1, top + 1):
        first[l] = (first[l - 1] + (count[l - 1] if l > 1 else 0)) << 1
    lo = lengths[order]
    group_start = np.concatenate([[0], np.cumsum(count[1:])])[lo - 1]
    codes[order] = first[lo] + np.arange(order.size) - group_start
    return codes


def _reverse_bits(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Bit-reverse each ``codes[i]`` within its ``lengths[i]`` bits."""
    out = np.zeros_like(codes)
    for b in range(int(lengths.max(initial=0))):
        bit = (codes >> b) & 1
        out |= np.where(b < lengths, bit << np.maximum(lengths - 1 - b, 0), 0)
    return out


def encode(symbols: np.ndarray, alphabet_size: int | None = None, *,
           max_len: int = DEFAULT_MAX_LEN, block_size: int | None = None) -> bytes:
    """Huffman-encode nonnegative int ``symbols`` (< ``alphabet_size``) into a
    self-describing stream (format in the module docstring). ``block_size`` (symbols per
    decode block) defaults to :func:`auto_block_size`."""
    s, alphabet_size = _wire.check_symbols(symbols, alphabet_size)
    if block_size is None:
        block_size = auto_block_size(s.size)
    if not 1 <= block_size <= (1 << 16):
        raise ValueError(f"block_size must be in 1..65536, got {block_size}")
    head, counts, used, complete = _wire.write_header(s, alphabet_size)
    if complete:
        return head
    lengths = code_lengths(counts, max(max_len, int(used.size - 1).bit_length()))
    rev = _reverse_bits(canonical_codes(lengths), lengths)
    sym_len = lengths[s]
    ends = np.cumsum(sym_len)
    total_bits = int(ends[-1])
    payload = write_bits(rev[s], ends - sym_len, total_bits)
    starts = np.concatenate([[0], ends[:-1]])[::block_size]
    block_bits = np.diff(np.append(starts, total_bits))
    base = int(block_bits.min())
    dbits = bit_length(int(block_bits.max()) - base)
    return b"".join([
        head, pack(lengths[used], _LEN_BITS), uvarint(block_size), uvarint(total_bits),
        uvarint(base), bytes([dbits]), pack(block_bits - base, dbits), payload])


def _decode_table(lengths: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables of size ``2**top``: index = next ``top`` stream bits (LSB first),
    giving the symbol index (into the used-symbol list) and its code length. Every reversed
    code ``r`` of length ``l`` fills indices ``r + j * 2**l`` for ``j < 2**(top - l)``."""
    rev = _reverse_bits(canonical_codes(lengths), lengths)
    reps = np.int64(1) << (top - lengths)
    sym = np.repeat(np.arange(lengths.size, dtype=np.int64), reps)
    group_start = np.repeat(np.cumsum(reps) - reps, reps)
    j = np.arange(sym.size, dtype=np.int64) - group_start
    idx = rev[sym] + (j << lengths[sym])
    t_sym = np.empty(sym.size, np.int64)
    t_len = np.empty(sym.size, np.uint8)
    t_sym[idx] = sym
    t_len[idx] = lengths[sym]
    return t_sym, t_len


def decode(data: bytes) -> np.ndarray:
    """Decode a stream written by :func:`encode`; returns the smallest uint dtype holding
    the alphabet. Raises CodecError on any truncation or inconsistency."""
    r, n, dtype, used, decoded = _wire.read_header(data, "Huffman stream")
    if decoded is not None:
        return decoded
    k = used.size
    lengths = r.packed(k, _LEN_BITS, "code lengths").astype(np.int64)
    top = int(lengths.max())
    if lengths.min() < 1 or top > MAX_CODE_LEN:
        raise r.fail(f"code lengths must lie in 1..{MAX_CODE_LEN}")
    if int((np.int64(1) << (top - lengths)).sum()) != 1 << top:
        raise r.fail("code lengths do not form a complete prefix code (Kraft sum != 1)")
    block = r.varint("block size", 1 << 16)
    total_bits = r.varint("payload bit count", 8 * r.remaining)
    if block == 0:
        raise r.fail("block size is 0")
    if n > total_bits:
        raise r.fail(f"{n} symbols cannot fit in {total_bits} payload bits")
    # the 2**top decode table is bounded by what the encoder writes or the payload backs, not by 5 bits
    if 1 << top > max(1 << DEFAULT_MAX_LEN, 1 << int(k - 1).bit_length(), 8 * total_bits):
        raise r.fail(f"codes of up to {top} bits for {k} symbols and {total_bits} payload bits are not "
                     "what the encoder writes")
    nblocks = -(-n // block)
    base = r.varint("block length base", total_bits)
    dbits = r.u8("block length width")
    if not 1 <= dbits <= 32:
        raise r.fail(f"block length width {dbits} is outside 1..32")
    if nblocks * dbits > 8 * r.remaining:
        raise r.fail(f"{nblocks} block lengths cannot fit in the remaining bytes")
    block_bits = r.packed(nblocks, dbits, "block lengths").astype(np.int64) + base
    payload = r.take((total_bits + 7) // 8, "payload")
    r.done()
    ends = np.cumsum(block_bits)
    if ends[-1] != total_bits:
        raise r.fail("block lengths do not add up to the payload bit count")
    t_sym, t_len = _decode_table(lengths, top)
    t_sym = used.astype(dtype)[t_sym]
    # words with enough zero padding that a block running wild stays in bounds
    u = word_pairs(payload, (block * top) // 32 + 3)
    steps = min(block, n)
    out, pos, last_end = _decode_blocks(u, t_sym, t_len, top, (ends - block_bits), steps,
                                        n - (nblocks - 1) * block)
    if last_end != total_bits or (nblocks > 1 and
                                  (pos[:-1].astype(np.int64) != ends[:-1]).any()):
        raise r.fail("decoded blocks do not end where the header says (corrupt payload)")
    return out.T.ravel()[:n]


def _decode_blocks(u, t_sym, t_len, top, starts, steps, last):
    """Run ``steps`` table lookups on every block at once (see the module docstring).

    Returns the (steps, nblocks) symbols, the final bit positions, and the position of the
    last block after its ``last`` symbols. In-place ufuncs keep each step allocation-free.
    """
    nb = starts.size
    pos = starts.astype(np.uint64)
    out = np.empty((steps, nb), t_sym.dtype)
    j, w, sh = (np.empty(nb, np.uint64) for _ in range(3))
    ln = np.empty(nb, t_len.dtype)
    mask = np.uint64((1 << top) - 1)
    five, thirty_one = np.uint64(5), np.uint64(31)
    last_end = None
    for step in range(steps):
        np.right_shift(pos, five, out=j)
        np.take(u, j, out=w)
        np.bitwise_and(pos, thirty_one, out=sh)
        np.right_shift(w, sh, out=w)
        np.bitwise_and(w, mask, out=w)
        np.take(t_sym, w, out=out[step])
        np.take(t_len, w, out=ln)
        np.add(pos, ln, out=pos)
        if step == last - 1:
            last_end = int(pos[-1])
    return out, pos, last_end
