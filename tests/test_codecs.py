"""Property tests for onnxcompress.formats.codecs: exact round trips, and CodecError (never another
exception, never a hang) on truncated or corrupted streams."""
from __future__ import annotations

import heapq
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from onnxcompress.formats import codecs as C
from onnxcompress.formats.codecs import ans, bitpack, frame, huffman, raw, relidx
from onnxcompress.errors import CodecError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ENTROPY_CODECS = {"raw": raw, "huffman": huffman, "ans": ans}


@st.composite
def streams(draw, max_size=600):
    """(symbols, alphabet_size): arbitrary, skewed (99.9% one symbol), all-distinct,
    single-symbol and empty streams over alphabets up to 65536."""
    alphabet = draw(st.sampled_from([1, 2, 3, 32, 256, 1000, 65536]))
    kind = draw(st.sampled_from(["any", "skewed", "distinct", "single", "empty"]))
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, max_size))
    rng = np.random.default_rng(seed)
    if kind == "empty":
        s = np.zeros(0, np.int64)
    elif kind == "single":
        s = np.full(n, rng.integers(alphabet), np.int64)
    elif kind == "distinct":
        s = rng.permutation(alphabet)[: min(n, alphabet)].astype(np.int64)
    elif kind == "skewed":
        s = np.full(max(n, 1000), rng.integers(alphabet), np.int64)
        s[rng.integers(s.size)] = rng.integers(alphabet)
    else:
        k = draw(st.integers(1, alphabet))
        s = draw(st.lists(st.integers(0, k - 1), min_size=0, max_size=max_size))
        s = np.array(s, np.int64)
    return s, alphabet


def _expect_codec_error(fn, data):
    """Call ``fn(data)``; it must raise CodecError and nothing else."""
    with pytest.raises(CodecError):
        fn(data)


# ---------------------------------------------------------------- bitpack
@SETTINGS
@given(bits=st.integers(1, 32), seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300))
def test_bitpack_roundtrip(bits, seed, n):
    v = np.random.default_rng(seed).integers(0, 2**bits, n, dtype=np.uint64)
    data = bitpack.pack(v, bits)
    assert len(data) == (n * bits + 7) // 8
    out = bitpack.unpack(data, bits, n)
    assert out.dtype == bitpack.uint_dtype(bits)
    np.testing.assert_array_equal(out, v)
    if data:
        _expect_codec_error(lambda d: bitpack.unpack(d, bits, n), data[:-1])


def test_bitpack_layout_is_lsb_first():
    assert bitpack.pack(np.array([1, 0, 3]), 2) == bytes([0b110001])
    assert bitpack.pack(np.array([5]), 3) == bytes([5])


def test_bitpack_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        bitpack.pack(np.array([4]), 2)
    with pytest.raises(ValueError):
        bitpack.pack(np.array([-1]), 4)
    with pytest.raises(ValueError):
        bitpack.pack(np.array([1]), 33)


# ---------------------------------------------------------------- entropy codecs
@pytest.mark.parametrize("name", list(ENTROPY_CODECS))
@SETTINGS
@given(case=streams())
def test_entropy_codec_roundtrip(name, case):
    s, alphabet = case
    codec = ENTROPY_CODECS[name]
    out = codec.decode(codec.encode(s, alphabet))
    np.testing.assert_array_equal(out, s)
    assert out.dtype == (np.uint8 if alphabet <= 256 else np.uint16)


@pytest.mark.parametrize("name", list(ENTROPY_CODECS))
@SETTINGS
@given(case=streams(max_size=200), cut=st.floats(0, 1, exclude_max=True))
def test_entropy_codec_truncation_raises(name, case, cut):
    s, alphabet = case
    codec = ENTROPY_CODECS[name]
    data = codec.encode(s, alphabet)
    _expect_codec_error(codec.decode, data[: int(cut * len(data))])
    _expect_codec_error(codec.decode, data + b"\x00")


@pytest.mark.parametrize("name", list(ENTROPY_CODECS))
def test_entropy_codec_every_truncation_raises(name):
    rng = np.random.default_rng(1)
    s = np.minimum(rng.geometric(0.3, 3000) - 1, 31)
    data = ENTROPY_CODECS[name].encode(s, 32)
    for cut in range(len(data)):
        _expect_codec_error(ENTROPY_CODECS[name].decode, data[:cut])


@pytest.mark.parametrize("name", list(ENTROPY_CODECS))
@SETTINGS
@given(case=streams(max_size=200), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_entropy_codec_bit_flip_never_crashes(name, case, where, bit):
    """Without a checksum a flip may decode to other symbols, but only CodecError escapes."""
    s, alphabet = case
    codec = ENTROPY_CODECS[name]
    data = bytearray(codec.encode(s, alphabet))
    data[int(where * len(data))] ^= 1 << bit
    try:
        out = codec.decode(bytes(data))
    except CodecError:
        return
    assert isinstance(out, np.ndarray)


def test_ans_is_close_to_entropy_on_skewed_data():
    rng = np.random.default_rng(2)
    s = np.clip(np.rint(rng.laplace(0, 1.5, 200_000)), -15, 16).astype(np.int64) + 15
    h = C.entropy_bits(s)
    ans_bits = 8 * len(ans.encode(s, 32)) / s.size
    huff_bits = 8 * len(huffman.encode(s, 32)) / s.size
    assert h <= ans_bits < h + 0.01
    assert h <= huff_bits < h + 1
    very_skewed = (rng.random(100_000) < 0.001).astype(np.int64)
    np.testing.assert_array_equal(ans.decode(ans.encode(very_skewed, 2)), very_skewed)
    assert 8 * len(ans.encode(very_skewed, 2)) / very_skewed.size < 0.02


def test_single_symbol_stream_stores_only_the_count():
    for codec in (huffman, ans):
        data = codec.encode(np.full(1_000_000, 7), 32)
        assert len(data) < 16
        np.testing.assert_array_equal(codec.decode(data), np.full(1_000_000, 7))


def test_huffman_multi_block_and_block_sizes():
    rng = np.random.default_rng(3)
    s = np.minimum(rng.geometric(0.2, 10_001) - 1, 255)
    for block in (1, 7, 256, 1024, 65536):
        np.testing.assert_array_equal(
            huffman.decode(huffman.encode(s, 256, block_size=block)), s)


# ---------------------------------------------------------------- Huffman code lengths
def _reference_huffman_cost(counts):
    """Total bits of an unrestricted Huffman code, by the textbook heap merge."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) <= 1:
        return 0
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


@SETTINGS
@given(counts=st.lists(st.integers(0, 10**6), min_size=1, max_size=300),
       max_len=st.integers(1, 24))
def test_code_lengths_properties(counts, max_len):
    c = np.array(counts, np.int64)
    k = int((c > 0).sum())
    if k > 2**max_len:
        with pytest.raises(ValueError):
            huffman.code_lengths(c, max_len)
        return
    lengths = huffman.code_lengths(c, max_len)
    assert (lengths[c == 0] == 0).all()
    if k <= 1:
        assert (lengths == 0).all()
        return
    used = lengths[c > 0]
    assert used.min() >= 1 and used.max() <= max_len
    assert sum(2.0 ** -int(l) for l in used) == 1.0  # complete prefix code
    cost = int((c * lengths).sum())
    reference = _reference_huffman_cost(c)
    assert cost >= reference
    n = c.sum()
    h = C.entropy_bits(np.repeat(np.arange(c.size), c))
    if max_len >= 20 or cost == reference:
        assert cost <= n * h + n + 1e-6 * n
    # when an unrestricted optimal code already fits, the limit does not bind: optimal cost
    if _reference_max_len(c) <= max_len:
        assert cost == reference


def _reference_max_len(counts):
    heap = [(int(x), 0) for x in counts if x > 0]
    heapq.heapify(heap)
    while len(heap) > 1:
        (a, da), (b, db) = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, (a + b, max(da, db) + 1))
    return heap[0][1]


def test_code_lengths_limit_binds_on_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    c = np.array(fib, np.int64)
    assert _reference_max_len(c) == 29
    lengths = huffman.code_lengths(c, 12)
    assert lengths.max() == 12 and sum(2.0 ** -int(l) for l in lengths) == 1.0
    s = np.repeat(np.arange(c.size), np.minimum(c, 50))
    np.testing.assert_array_equal(huffman.decode(huffman.encode(s, max_len=6)), s)


def test_code_lengths_optimal_under_binding_limit():
    # 5 codes of length <= 3: {1,3,3,3,3} costs 32 bits, {2,2,2,3,3} costs 34
    assert huffman.code_lengths(np.array([1, 1, 2, 4, 8]), 3).tolist() == [3, 3, 3, 3, 1]
    assert huffman.code_lengths(np.array([1, 1, 2, 4, 8]), 4).tolist() == [4, 4, 3, 2, 1]


def test_canonical_codes_are_prefix_free():
    lengths = np.array([2, 1, 3, 3, 0])
    codes = huffman.canonical_codes(lengths)
    assert codes.tolist() == [0b10, 0b0, 0b110, 0b111, 0]


# ---------------------------------------------------------------- relative indices
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 3000),
       density=st.floats(0, 1), index_bits=st.integers(1, 16))
def test_relidx_roundtrip_and_fillers(seed, n, density, index_bits):
    rng = np.random.default_rng(seed)
    codes = np.where(rng.random(n) < density, rng.integers(1, 64, n), 0).astype(np.uint8)
    gaps, values = relidx.encode(codes, index_bits)
    m = 2**index_bits
    assert gaps.size == values.size == relidx.entry_count(codes, index_bits)
    assert ((gaps >= 1) & (gaps <= m)).all()
    np.testing.assert_array_equal(relidx.decode(gaps, values, n), codes)
    # filler zeros appear exactly when a gap overflows, at the max jump
    d = np.diff(np.flatnonzero(codes), prepend=-1)
    fillers = values == 0
    assert fillers.sum() == ((d - 1) // m).sum()
    assert (gaps[fillers] == m).all()
    # stored form fits index_bits bits
    stored = bitpack.unpack(bitpack.pack(gaps - 1, index_bits), index_bits, gaps.size)
    np.testing.assert_array_equal(stored.astype(np.int64) + 1, gaps)
    best = relidx.best_index_bits(codes, 6)
    costs = [relidx.total_bits(codes, b, 6) for b in range(1, 17)]
    assert relidx.total_bits(codes, best, 6) == min(costs)


def test_relidx_matches_paper_figure_2():
    codes = np.zeros(16, np.int64)
    codes[[1, 4, 15]] = [3, 5, 7]  # 3-bit indices: the jump 4 -> 15 needs a filler at 12
    gaps, values = relidx.encode(codes, 3)
    assert gaps.tolist() == [2, 3, 8, 3] and values.tolist() == [3, 5, 0, 7]


def test_relidx_decode_rejects_bad_input():
    for gaps, values, n in [([1, 2], [1], 5), ([0], [1], 5), ([3, 3], [1, 1], 5)]:
        _expect_codec_error(lambda _: relidx.decode(np.array(gaps), np.array(values), n), None)


# ---------------------------------------------------------------- frame
names = st.text(min_size=0, max_size=12)


@SETTINGS
@given(streams_=st.dictionaries(names, st.binary(max_size=200), max_size=6),
       where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_frame_roundtrip_and_corruption(streams_, where, bit):
    data = frame.pack_streams(streams_)
    assert frame.unpack_streams(data) == streams_
    assert frame.framed_size({k: len(v) for k, v in streams_.items()}) == len(data)
    _expect_codec_error(frame.unpack_streams, data[: int(where * len(data))])
    flipped = bytearray(data)
    flipped[int(where * len(data))] ^= 1 << bit
    _expect_codec_error(frame.unpack_streams, bytes(flipped))


def test_frame_errors_name_the_problem():
    data = frame.pack_streams({"weights": b"abcdef"})
    with pytest.raises(CodecError, match="magic"):
        frame.unpack_streams(b"XXXX" + data[4:])
    with pytest.raises(CodecError, match="version"):
        frame.unpack_streams(data[:4] + b"\x09" + data[5:])
    with pytest.raises(CodecError, match="'weights'"):
        frame.unpack_streams(data[:-1] + bytes([data[-1] ^ 1]))


# ---------------------------------------------------------------- choice layer
@SETTINGS
@given(case=streams())
def test_encode_best_roundtrip_and_is_smallest(case):
    s, alphabet = case
    method, data = C.encode_best(s, alphabet)
    assert method in C.METHODS
    np.testing.assert_array_equal(C.decode_any(data), s)
    sizes = {m: len(C.encode(m, s, alphabet)) for m in C.METHODS}
    assert len(data) == min(sizes.values())
    for m in C.METHODS:
        np.testing.assert_array_equal(C.decode_any(C.encode(m, s, alphabet)), s)


@SETTINGS
@given(case=streams(max_size=200), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7), method=st.sampled_from(C.METHODS))
def test_decode_any_detects_any_truncation_or_bit_flip(case, where, bit, method):
    s, alphabet = case
    data = C.encode(method, s, alphabet)
    _expect_codec_error(C.decode_any, data[: int(where * len(data))])
    flipped = bytearray(data)
    flipped[int(where * len(data))] ^= 1 << bit
    _expect_codec_error(C.decode_any, bytes(flipped))


def test_decode_any_every_truncation_and_flip_raises():
    rng = np.random.default_rng(4)
    s = np.minimum(rng.geometric(0.4, 500) - 1, 31)
    for method in C.METHODS:
        data = C.encode(method, s, 32)
        for cut in range(len(data)):
            _expect_codec_error(C.decode_any, data[:cut])
        for i in range(len(data)):
            flipped = bytearray(data)
            flipped[i] ^= 1 << (i % 8)
            _expect_codec_error(C.decode_any, bytes(flipped))


def test_decode_any_unknown_tag():
    body = b"\x07" + raw.encode(np.array([1, 2]), 4)
    with pytest.raises(CodecError, match="tag"):
        C.decode_any(body + zlib.crc32(body).to_bytes(4, "little"))


def test_entropy_bits():
    assert C.entropy_bits(np.array([], np.int64)) == 0.0
    assert C.entropy_bits(np.array([3, 3, 3])) == 0.0
    assert C.entropy_bits(np.array([0, 1, 2, 3])) == pytest.approx(2.0)


def test_encoders_reject_bad_symbols():
    for codec in ENTROPY_CODECS.values():
        with pytest.raises(ValueError):
            codec.encode(np.array([5]), 4)
        with pytest.raises(ValueError):
            codec.encode(np.array([-1]))


@SETTINGS
@given(case=streams())
def test_the_ans_size_estimated_from_counts_is_the_coded_size_or_4_bytes_above(case):
    s, alphabet = case
    exact = len(ans.encode(s, alphabet))
    estimated = ans.estimated_size(np.bincount(np.asarray(s, np.int64), minlength=alphabet))
    assert exact <= estimated <= exact + 4
    assert C.choice.estimated_ans_size(np.bincount(np.asarray(s, np.int64), minlength=alphabet)) == estimated + 5


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.uint32, bool])
def test_entropy_bits_counts_without_sorting_as_with(dtype):
    s = np.random.default_rng(0).integers(0, 2 if dtype is bool else 50, 10_001).astype(dtype)
    _, counts = np.unique(s, return_counts=True)
    p = counts / s.size
    assert C.entropy_bits(s) == float(-(p * np.log2(p)).sum())
    assert C.entropy_bits(np.array([2 ** 40, 1])) == 1.0  # a huge symbol: no table that large
