"""The numeric kernels of weight sharing's granularities, on the channel-first (C, K) matrix of a weight.

:func:`fit_tensor` (one codebook), :func:`fit_groups` (one per group of channels),
:func:`fit_scaled` (one codebook around a scale per channel, by block coordinate descent) and
:func:`pick_outliers` (the entries kept exact); :func:`onnxcompress.fitting.granular.fit` assembles them
into a shared weight, and its docstring states the math. Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcompress.numerics.gptq import normalize, store_scale, use_float16
from onnxcompress.numerics.histogram import CHUNK
from onnxcompress.numerics.sorted_rows import SortedRows
from onnxcompress.numerics.kmeans import assign, centroids_many, kmeans_centroids
from onnxcompress.numerics.measures import nearest_codes


def to_matrix(array: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """Channel-first (C, K) view of a weight; one row (C = 1) when it has no channel axis."""
    if channel_axis is None or array.ndim == 0:
        return array.reshape(1, -1)
    return np.moveaxis(array, channel_axis, 0).reshape(array.shape[channel_axis], -1)


def from_matrix(matrix: np.ndarray, shape: tuple[int, ...], channel_axis: int | None) -> np.ndarray:
    if channel_axis is None or len(shape) == 0:
        return matrix.reshape(shape)
    moved = (shape[channel_axis],) + tuple(s for i, s in enumerate(shape) if i != channel_axis)
    return np.moveaxis(matrix.reshape(moved), 0, channel_axis)


_BLOCK_ROWS = 16  # leading rows a block of a layout change copies (a few KB of each channel: cache-sized)


def channel_first(array: np.ndarray, channel_axis: int | None, dtype=None) -> np.ndarray:
    """``np.ascontiguousarray(to_matrix(array, channel_axis), dtype)``: the same values, copied (and cast) a block of
    _BLOCK_ROWS leading rows at a time when the channel axis moves (4x faster than numpy's one strided copy
    of a transposed 2048x2048 float32 matrix)."""
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    if channel_axis is None or array.ndim == 0 or channel_axis == 0:
        return np.ascontiguousarray(to_matrix(array, channel_axis), dtype)
    shape = array.shape
    lead, channels = int(np.prod(shape[:channel_axis])), shape[channel_axis]
    inner = array.size // (lead * channels)
    source = array.reshape(lead, channels) if inner == 1 else array.reshape(lead, channels, inner)
    out = np.empty(source.shape[1::-1] + source.shape[2:], dtype)  # (channels, lead[, inner])
    axes = (1, 0) if inner == 1 else (1, 0, 2)  # no trailing axis of one: numpy copies it an element at a time
    for lo in range(0, lead, _BLOCK_ROWS):
        out[:, lo:lo + _BLOCK_ROWS] = source[lo:lo + _BLOCK_ROWS].transpose(axes)
    return out.reshape(channels, -1)


def weight_layout(matrix: np.ndarray, shape: tuple[int, ...], channel_axis: int | None) -> np.ndarray:
    """``from_matrix(matrix, shape, channel_axis).copy()`` (C order), copied a block of _BLOCK_ROWS channels at a
    time (3x faster than numpy's one strided copy for the uint8 codes of a 2048x2048 MatMul weight)."""
    if channel_axis is None or len(shape) == 0 or channel_axis == 0:
        return from_matrix(matrix, shape, channel_axis).copy()
    lead, channels = int(np.prod(shape[:channel_axis])), shape[channel_axis]
    inner = matrix.size // (lead * channels)
    source = matrix.reshape(channels, lead) if inner == 1 else matrix.reshape(channels, lead, inner)
    out = np.empty(source.shape[1::-1] + source.shape[2:], matrix.dtype)  # (lead, channels[, inner])
    axes = (1, 0) if inner == 1 else (1, 0, 2)
    for lo in range(0, channels, _BLOCK_ROWS):  # a block of the matrix's rows (channels) at a time
        out[:, lo:lo + _BLOCK_ROWS] = source[lo:lo + _BLOCK_ROWS].transpose(axes)
    return out.reshape(shape)


def flat_indices(mask: np.ndarray, shape: tuple[int, ...], channel_axis: int | None) -> np.ndarray:
    """``np.flatnonzero(from_matrix(mask, shape, channel_axis))``: the ascending flat indices, in the weight's own
    layout, of the True entries of its channel-first (C, K) `mask`, found in the (C, K) layout (no copy of the
    mask in the weight's layout, which a moved channel axis costs)."""
    if channel_axis is None or len(shape) == 0 or channel_axis == 0:  # the same order in both layouts
        return np.flatnonzero(mask)
    rows, cols = np.divmod(np.flatnonzero(mask), mask.shape[1])  # 10x faster than a 2-D np.nonzero
    coords = list(np.unravel_index(cols, tuple(s for i, s in enumerate(shape) if i != channel_axis)))
    coords.insert(channel_axis, rows)
    return np.sort(np.ravel_multi_index(coords, shape))


def pick_outliers(w: np.ndarray, kept: np.ndarray, fraction: float, *, relative: bool) -> np.ndarray:
    """The round(fraction * kept) kept entries largest in |w| (in |w_jk| / rms_j when relative),
    the scores in float64 (rms_j over the kept entries of channel j; 0 where rms_j = 0)."""
    count = int(round(fraction * int(kept.sum())))
    picked = np.zeros(w.shape, bool)
    if count <= 0:
        return picked
    every = bool(kept.all())
    rms = None
    if relative:  # sums of squares a block of channels at a time (each row's sum is the same)
        total = np.empty(w.shape[0])
        step = max(1, CHUNK // max(w.shape[1], 1))
        for lo in range(0, w.shape[0], step):
            square = np.square(w[lo:lo + step], dtype=np.float64)  # exact for float32 w
            total[lo:lo + step] = (square if every else square * kept[lo:lo + step]).sum(1)
        rms = np.sqrt(total / np.maximum(kept.sum(1), 1))
    cols = w.shape[1]

    def score(index: np.ndarray) -> np.ndarray:  # exact scores of flat indices
        x = np.abs(w.reshape(-1)[index].astype(np.float64))
        if rms is not None:
            r = rms[index // cols]
            x = np.divide(x, r, out=np.zeros_like(x), where=r > 0)
        return x if every else np.where(kept.reshape(-1)[index], x, -1.0)

    picked.reshape(-1)[_top(w, rms, None if every else kept, score, count)] = True
    return picked


def _top(w, rms, kept, score, count: int) -> np.ndarray:
    """Flat indices of the `count` largest score(index) (0 < count <= size): on a large weight,
    the scores are first estimated in w's precision for every entry, and computed exactly only for
    those within 1e-5 of a strided sample's quantile (loose by a factor of two); when at least
    `count` of those reach it, no other entry can (the estimate is within 1e-6 of the score),
    so the set is that of a partition of every exact score, up to ties at the cut."""
    size = w.size
    if size > 1 << 20 and count * 8 < size:
        estimate = np.abs(w)
        if rms is not None:
            estimate *= np.divide(1.0, rms, out=np.zeros_like(rms), where=rms > 0).astype(w.dtype)[:, None]
        if kept is not None:
            estimate[~kept] = -1
        estimate = estimate.reshape(-1)
        sample = estimate[::64]
        rank = sample.size - 1 - min(sample.size - 1, 2 * count // 64 + 8)
        cut = float(np.partition(sample, rank)[rank])
        if cut > 0:
            near = np.flatnonzero(estimate >= cut * (1 - 1e-5))
            exact = score(near)
            if np.count_nonzero(exact >= cut) >= count:
                return near[np.argpartition(exact, exact.size - count)[exact.size - count:]]
    exact = score(np.arange(size))
    return np.argpartition(exact, size - count)[size - count:]


def codebook_of(values, weights, bits, keep_zero, init, seed) -> np.ndarray:
    """Centroids (float64, keep_zero: [0.0, ...]) of the values; at least one centroid."""
    if values.size == 0:
        return np.zeros(1)
    centroids = kmeans_centroids(values, 2 ** bits, init=init, seed=seed, keep_zero=keep_zero,
                                 sample_weight=None if weights is None else np.maximum(weights, 0.0))
    return centroids if centroids.size else np.zeros(1)


def fit_tensor(w, fitted, a, bits, keep_zero, init, seed):
    book = codebook_of(w[fitted], None if a is None else a[fitted], bits, keep_zero, init, seed)
    return nearest_codes(w, book, keep_zero=keep_zero), book


def fit_groups(w, fitted, a, bits, group_size, keep_zero, init, seed):
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, not {group_size}")
    codes = np.zeros(w.shape, np.int64)
    books, offsets = [], np.zeros(w.shape[0], np.int32)
    start = 0
    groups = [slice(lo, lo + group_size) for lo in range(0, w.shape[0], group_size)]
    together = None  # unweighted, no kept zeros: every group's k-means at once, the same codebooks
    if a is None and not keep_zero:
        together = [c if c.size else np.zeros(1) for c in
                    centroids_many([w[rows][fitted[rows]] for rows in groups], 2 ** bits, init=init, seed=seed)]
    for g, rows in enumerate(groups):
        if together is None:
            codes[rows], book = fit_tensor(w[rows], fitted[rows], None if a is None else a[rows], bits, keep_zero,
                                           init, seed)
        else:
            book = together[g]
            codes[rows] = nearest_codes(w[rows], book, keep_zero=False)
        offsets[rows] = start
        books.append(book)
        start += book.size
    return codes, np.concatenate(books), offsets


@dataclass(frozen=True, eq=False)
class ScaledFit:
    """How :func:`fit_scaled` codes a weight: `bits` a code, code 0 kept for exact zeros (keep_zero), the
    codebook's start, `iterations` rounds of scale and centroid steps, and the precision the scales are
    stored in ("auto": float16 where exact enough). The codebook starts from k-means (init, seed) of
    u_jk = w_jk / s_j, s_j = max_k |w_jk| over the fitted entries, or from `start`, a codebook of u already
    (ascending; with keep_zero, 0.0 first): a fit of the same kind on a sample of the weight's channels,
    restated in those units by :func:`scaled_start`."""

    bits: int
    keep_zero: bool = False
    init: str = "linear"
    seed: int = 0
    iterations: int = 4
    scale_dtype: str = "auto"
    start: np.ndarray | None = None


def fit_scaled(w, fitted, a, how: ScaledFit):
    """Block coordinate descent on E = sum a (w - s_j c[code])^2 over the fitted entries.

    Each round needs, per channel j and code m, A_jm = sum_{k: code_jk = m} a_jk w_jk and
    B_jm = sum_{k: code_jk = m} a_jk over the fitted entries (:func:`_code_sums`): then the scale
    step is s_j = sum_m c_m A_jm / sum_m c_m^2 B_jm and the centroid step
    c_m = sum_j s_j A_jm / sum_j s_j^2 B_jm, so one pass over the weight per round (the codes and
    their sums, a block of channels at a time) instead of a full-size temporary per product. w is
    float32 or float64; the codes are found in its precision, every sum is accumulated in float64."""
    keep_zero, scale_dtype = how.keep_zero, how.scale_dtype
    every = bool(fitted.all())
    s = (np.abs(w) if every else np.where(fitted, np.abs(w), 0)).max(axis=1).astype(np.float64)
    s = store_scale(s, scale_dtype)
    if how.start is None:
        u = normalize(w, s.astype(w.dtype))
        book = codebook_of(u.reshape(-1) if every else u[fitted], None if a is None else
                           (a * np.square(s)[:, None])[fitted], how.bits, keep_zero, how.init, how.seed)
        del u
    else:
        book = np.asarray(how.start, np.float64).copy()
    mask = None if every else fitted
    rows = SortedRows.of(w, fitted) if a is None and not keep_zero and how.iterations else None

    def code_sums(s, book):  # (codes or None: the sorted rows gave the sums without them, A, B)
        found = None if rows is None else rows.sums(s, book)
        return (None, *found) if found is not None else _code_sums(w, s, book, mask, a, keep_zero)

    codes, sums, counts = code_sums(s, book)
    last, remap = (s, book), None  # what the last codes were found with, and how they were renumbered since
    for _ in range(how.iterations):
        num, den = sums @ book, counts @ np.square(book)
        s = store_scale(np.where(den > 0, num / np.where(den > 0, den, 1.0), s), scale_dtype)
        codes, sums, counts = code_sums(s, book)
        last = (s, book)
        num, den = s @ sums, np.square(s) @ counts
        book = np.where(den > 0, num / np.where(den > 0, den, 1.0), book)
        if keep_zero:
            book[0] = 0.0
        order = np.argsort(book[1:] if keep_zero else book, kind="stable")
        if keep_zero:
            order = np.concatenate(([0], order + 1))
        book, sums, counts = book[order], sums[:, order], counts[:, order]
        remap = np.argsort(order)
        codes = None if codes is None else remap.astype(codes.dtype)[codes]
    if codes is None:  # found once, for the last scales and codebook, as _code_sums finds them
        codes = nearest_scaled(w, *last, keep_zero)
        codes = codes if remap is None else remap.astype(codes.dtype)[codes]
    return codes, book, s.astype(np.float16 if use_float16(s, scale_dtype) else np.float32)


def scaled_start(w, fitted, book, s) -> np.ndarray | None:
    """`book`, the codebook of a per-channel fit of the (C, K) matrix w with scales s (over its `fitted`
    entries), restated in the units :func:`fit_scaled` starts in (w_jk / max_k |w_jk|): times the median over
    channels of s_j / max_k |w_jk|. None when no channel has both positive."""
    top = (np.abs(w) if fitted.all() else np.where(fitted, np.abs(w), 0)).max(axis=1).astype(np.float64)
    s = np.asarray(s, np.float64)
    ok = (top > 0) & (s > 0)
    if not ok.any():
        return None
    return np.asarray(book, np.float64) * float(np.median(s[ok] / top[ok]))


def nearest_scaled(w, s, book, keep_zero) -> np.ndarray:
    """The code of each w_jk / s_j (its nearest centroid, ties lower; 0 where s_j = 0 and keep_zero), in the
    smallest unsigned type, a block of about CHUNK entries at a time, in w's precision."""
    rows, cols = w.shape
    codes = np.empty(w.shape, np.uint8 if book.size <= 256 else np.uint16)
    scale = s.astype(w.dtype)
    step = max(1, CHUNK // max(cols, 1))
    for lo in range(0, rows, step):
        u = normalize(w[lo:lo + step], scale[lo:lo + step])
        codes[lo:lo + step] = nearest_codes(u, book, keep_zero=True) if keep_zero else assign(u, book)
    return codes


def _code_sums(w, s, book, fitted, a, keep_zero):
    """(codes, A, B): the nearest centroid of each w_jk / s_j (codes in the smallest unsigned type),
    A_jm = sum a_jk w_jk and B_jm = sum a_jk over the fitted entries (all when `fitted` is None) of
    code m in channel j (a = 1 when None), in float64; a block of about CHUNK entries at a time."""
    rows, cols = w.shape
    m = book.size
    codes = np.empty(w.shape, np.uint8 if m <= 256 else np.uint16)
    sums, counts = np.zeros((rows, m)), np.zeros((rows, m))
    step = max(1, CHUNK // max(cols, 1))
    base = np.repeat(np.arange(0, step * m, m), cols)
    for lo in range(0, rows, step):
        block = slice(lo, lo + step)
        part = nearest_scaled(w[block], s[block], book, keep_zero)
        codes[block] = part
        n = part.shape[0]
        index = part.astype(np.intp).reshape(-1)
        index += base[:index.size]
        if fitted is not None:  # the others go to a bin past the end
            index[~fitted[block].reshape(-1)] = n * m
        values = w[block].reshape(-1)
        weight = None if a is None else a[block].reshape(-1)
        sums[block] = np.bincount(index, values if weight is None else weight * values, n * m + 1)[:-1].reshape(n, m)
        counts[block] = np.bincount(index, weight, n * m + 1)[:-1].reshape(n, m)
    return codes, sums, counts
