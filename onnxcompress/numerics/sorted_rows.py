"""Per-(channel, code) sums of a per-channel-scaled codebook without a pass over the weight.

The per-channel fit (:func:`onnxcompress.numerics.granular_fit.fit_scaled`) needs, every round, for
channel j and code m, A_jm = sum w_jk and B_jm = #entries over the fitted entries whose code is m,
the code of w_jk being its nearest centroid of u_jk = w_jk / s_j (float32 division; ties lower). For
s_j > 0 the code is nondecreasing in w_jk, so in each channel's sorted values the entries of one
code are a run, cut where u crosses a boundary. With the channels sorted once (float32, -0.0 made
0.0) and float64 prefix sums P of the sorted values, a round costs one float32 threshold per
(channel, boundary),

    x_jm = the largest float32 x with fl32(x / s_j) <= d_m,   d_m the float32 form of boundary m

(found from fl32(d_m s_j) by a few steps of one ulp, checked with the division itself), a binary
search of each channel's thresholds in its own sorted values (one float32 `searchsorted` a channel,
in a few KB, when there are at most LOOP_MAX_ROWS channels; else one of all of them in int64 keys:
the channel, then the value's order-preserving bits), and A_jm = P[t_j,m+1] - P[t_j,m],
B_jm = t_j,m+1 - t_j,m: O(C 2^b log K) instead of O(C K). The codes are the same as the division's
(exact); the sums are the same sums in another order.

The fitted entries of a channel must be a run of its sorted values: the unfitted ones (outliers
by |w| within their channel) its smallest (w <= 0) and largest (w > 0) ones, which
:meth:`SortedRows.of` checks. Pure numpy; float32 weights only (others: None, the caller's pass).
"""
from __future__ import annotations

import numpy as np

from onnxcompress.numerics.histogram import float32_below
from onnxcompress.numerics.kmeans_sorted import boundaries, FLOAT32_KEY_OFFSET, float32_keys, ordered_int32

_STEPS = 8  # ulp steps allowed to settle a threshold (one or two are needed)
# up to this many channels each is searched on its own (cache-local, no int64 keys); more (short) channels are
# searched together in int64 keys, where one call per channel would cost more than the keys
LOOP_MAX_ROWS = 16384


class SortedRows:
    """The sorted channels of a float32 (C, K) weight and their prefix sums (module docstring)."""

    def __init__(self, values: np.ndarray, keys: np.ndarray | None, prefix: np.ndarray, lo: np.ndarray,
                 end: np.ndarray):
        # values: (C, K) float32 sorted per channel (no -0.0); keys: the same as flat int64 keys (channel, value),
        # only above LOOP_MAX_ROWS channels
        self.values, self.keys, self.prefix, self.lo, self.end = values, keys, prefix, lo, end

    @classmethod
    def of(cls, w: np.ndarray, fitted: np.ndarray) -> SortedRows | None:
        """None unless w is float32 and each channel's fitted entries are a run of its sorted values."""
        if w.dtype != np.float32 or w.ndim != 2 or w.size == 0 or w.shape[1] >= 1 << 31:
            return None
        rows, cols = w.shape
        values = w + np.float32(0)  # a copy, where -0.0 turns into 0.0: the float32 order is then the bits' order
        values.sort(axis=1)
        prefix = np.zeros((rows, cols + 1))
        prefix[:, 1:] = values  # then summed in place: 5x faster than cumsum casting as it goes (4096x4096)
        np.cumsum(prefix[:, 1:], axis=1, out=prefix[:, 1:])
        lo, end = np.zeros(rows, np.int64), np.full(rows, cols, np.int64)
        if not fitted.all():
            out = np.flatnonzero(~fitted)
            row, value = out // cols, w.reshape(-1)[out]
            low = value <= 0
            lo, high = np.bincount(row[low], minlength=rows), np.bincount(row[~low], minlength=rows)
            end = cols - high
            top_low, bottom_high = np.full(rows, -np.inf), np.full(rows, np.inf)
            np.maximum.at(top_low, row[low], value[low])
            np.minimum.at(bottom_high, row[~low], value[~low])
            some = np.flatnonzero(end > lo)
            inside = (top_low[some] > values[some, lo[some]]) | (bottom_high[some] < values[some, end[some] - 1])
            if inside.any():  # an unfitted entry within a channel's run
                return None
        keys = None
        if rows > LOOP_MAX_ROWS:
            keys = ordered_int32(values.view(np.int32)).astype(np.int64)
            keys += FLOAT32_KEY_OFFSET
            keys += (np.arange(rows, dtype=np.int64) << 32)[:, None]
            keys = keys.reshape(-1)
        return cls(values, keys, prefix, lo, end)

    def sums(self, s: np.ndarray, book: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(A, B), both (C, len(book)) float64, for scales s (float64, exact in float32) and an ascending
        codebook; None when a threshold does not settle (a negative or non-finite scale, an overflow)."""
        rows, cols = self.prefix.shape[0], self.prefix.shape[1] - 1
        if book.size < 2:
            counts = (self.end - self.lo).astype(np.float64)[:, None]
            sums = (self.prefix[np.arange(rows), self.end] - self.prefix[np.arange(rows), self.lo])[:, None]
            return sums, counts
        if np.any(book[1:] < book[:-1]) or np.any(s < 0) or not np.all(np.isfinite(s)):
            return None
        d = float32_below(boundaries(np.asarray(book, np.float64)))[None, :]
        scale = s.astype(np.float32)[:, None]
        zero = scale[:, 0] == 0
        scale = np.where(scale == 0, np.float32(1), scale)
        with np.errstate(over="ignore", invalid="ignore"):
            x = (d.astype(np.float64) * scale).astype(np.float32)
            for _ in range(_STEPS):
                over = ~(x / scale <= d)
                if not over.any():
                    break
                x[over] = np.nextafter(x[over], np.float32(-np.inf))
            else:
                return None
            for _ in range(_STEPS):
                up = np.nextafter(x, np.float32(np.inf))
                more = (up / scale <= d) & (up > x)
                if not more.any():
                    break
                x[more] = up[more]
            else:
                return None
        if not np.all(np.isfinite(x) | (np.abs(d) == np.inf)):
            return None
        at = self._counts_at_most(x)
        if zero.any():  # u = 0 in a channel of scale 0: all of it at or below d_m, or none
            at[zero] = np.where(d >= 0, cols, 0)
        cuts = np.concatenate((self.lo[:, None], np.clip(at, self.lo[:, None], self.end[:, None]),
                               self.end[:, None]), axis=1)
        sums = np.diff(np.take_along_axis(self.prefix, cuts, axis=1), axis=1)
        return sums, np.diff(cuts, axis=1).astype(np.float64)

    def _counts_at_most(self, x: np.ndarray) -> np.ndarray:
        """(C, m) int64: how many of channel j's values are <= x_jm (float32, no NaN)."""
        rows, cols = self.values.shape
        if self.keys is None:
            query = x + np.float32(0)  # -0.0 as 0.0, as in the values
            at = np.empty(x.shape, np.int64)
            for j in range(rows):
                at[j] = self.values[j].searchsorted(query[j], side="right")
            return at
        query = float32_keys(x)
        query += (np.arange(rows, dtype=np.int64) << 32)[:, None]
        at = np.searchsorted(self.keys, query.reshape(-1), side="right").reshape(query.shape)
        at -= (np.arange(rows, dtype=np.int64) * cols)[:, None]
        return at
