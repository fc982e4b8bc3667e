"""Hessian-aware code selection (GPTQ) and the code and scale primitives of weight sharing.

A weight is viewed channel-first as a (C, K) matrix W (rows j = output channels); the rows of
group g see the layer inputs x with Hessian H_g = E[x x^T], so replacing W by W_hat = W - D adds
sum_g tr(D_g H_g D_g^T) to the squared layer output error (:class:`LayerHessians`).
:func:`gptq_codes` picks each entry's code column by column feeding the error forward, and
:func:`refit_under_hessians` then solves for the centroids and per-channel scales that minimise
that output error with the codes fixed. :mod:`onnxcompress.fitting.granular` builds the candidates.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from onnxcompress.numerics.measures import nearest_codes

FLOAT16_TINY, FLOAT16_MAX = 2.0 ** -14, 65504.0


def normalize(w, s):
    """w_jk / s_j, 0 where a channel's scale is 0."""
    return np.divide(w, s[:, None], out=np.zeros_like(w), where=s[:, None] != 0)


def use_float16(s: np.ndarray, scale_dtype: str) -> bool:
    """Whether scales are stored as float16: asked for, or ("auto") every nonzero one is a normal float16."""
    if scale_dtype != "auto":
        return scale_dtype == "float16"
    mags = np.abs(s[s != 0])
    return bool(mags.size == 0 or (mags.min() >= FLOAT16_TINY and mags.max() <= FLOAT16_MAX))


def store_scale(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Scales rounded to the precision they will be stored in (so decode matches the fit)."""
    return s.astype(np.float16).astype(np.float64) if use_float16(s, scale_dtype) else \
        s.astype(np.float32).astype(np.float64)


@dataclass
class LayerHessians:
    """Per group of output channels, H_g = E[x x^T] of the layer's input rows (channel-first layout)."""

    hessians: list[np.ndarray]
    group_of_channel: np.ndarray  # (C,) group index of each output channel
    means: list[np.ndarray] | None = None  # per group, the mean input row E[x] (None: not measured)
    # per group, the cross Gram E[x x_r^T] of the current inputs x and the reference model's x_r (None: x = x_r)
    crosses: list[np.ndarray] | None = None
    _feedback: dict = field(default_factory=dict, repr=False)  # cache of feedback()
    _signals: dict = field(default_factory=dict, repr=False)  # signal of signal_and_noise() by the weights' digest

    def importance(self) -> np.ndarray:
        """a_jk = H_g(j)[k, k], floored at 1% of its mean so that unseen inputs still count a little."""
        diag = np.stack([np.diag(self.hessians[g]) for g in self.group_of_channel])
        return np.maximum(diag, 0.01 * max(float(diag.mean()), 1e-30))

    def feedback(self, group: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
        """Column order (decreasing diag H: "act-order") and the upper Cholesky factor U of the
        damped, reordered H^-1 (H + damp * mean(diag H) I; dead inputs get diag 1), cached."""
        key = (group, damp)
        if key not in self._feedback:
            h = np.array(self.hessians[group], dtype=np.float64)
            order = np.argsort(-np.diag(h), kind="stable")
            h = h[np.ix_(order, order)]
            dead = np.diag(h) <= 0
            h[dead, dead] = 1.0
            h[np.diag_indices(h.shape[0])] += damp * float(np.mean(np.diag(h)))
            try:
                u = np.linalg.cholesky(np.linalg.inv(h)).T
            except np.linalg.LinAlgError:
                u = np.diag(1.0 / np.sqrt(np.diag(h)))  # nearly singular even when damped: no feedback
            self._feedback[key] = (order, u)
        return self._feedback[key]

    def mean_shift(self, d: np.ndarray) -> np.ndarray:
        """(C,) the mean output change D_g E[x] of each row of a (C, K) weight change D (0 without means)."""
        shift = np.zeros(d.shape[0])
        for g, mu in enumerate(self.means or []):
            rows = self.group_of_channel == g
            shift[rows] = d[rows] @ mu
        return shift

    def energy(self, d: np.ndarray) -> float:
        """sum_g tr(D_g H_g D_g^T) of a (C, K) matrix D: one product (signal_and_noise(d, d) makes it twice)."""
        return sum(float(np.sum((d[rows] @ h) * d[rows]))
                   for rows, h in ((self.group_of_channel == g, h) for g, h in enumerate(self.hessians)))

    def signal_and_noise(self, w: np.ndarray, d: np.ndarray) -> tuple[float, float]:
        """(sum_g tr(W_g H_g W_g^T), sum_g tr(D_g H_g D_g^T)) for (C, K) matrices W and D; the signal of weights
        measured before is remembered (every candidate of a weight has the same: a product of C K^2 saved)."""
        w = np.ascontiguousarray(w, dtype=np.float64)
        key = (w.shape, hashlib.sha256(w.data).hexdigest())
        groups = [(self.group_of_channel == g, h) for g, h in enumerate(self.hessians)]
        signal, noise = self._signals.get(key), 0.0
        for rows, h in groups:
            noise += float(np.sum((d[rows] @ h) * d[rows]))
        if signal is None:
            signal = 0.0
            for rows, h in groups:
                signal += float(np.sum((w[rows] @ h) * w[rows]))
            while len(self._signals) >= 4:
                self._signals.pop(next(iter(self._signals)))
            self._signals[key] = signal
        return signal, noise


@dataclass(frozen=True)
class Grid:
    """The values a shared weight's entries take: code m of row j decodes to scale[j] * book[m] (scale
    None: 1); with keep_zero, code 0 is the exact 0.0 of pruned entries and keeps that value."""

    book: np.ndarray
    scale: np.ndarray | None
    keep_zero: bool


def gptq_codes(w, grid: Grid, kept, exact, hessians: LayerHessians, damp: float = 0.01, block: int = 64):
    """Codes chosen column by column with the error fed forward (GPTQ, Frantar et al. 2023).

    For the rows of each input group with Hessian H (damped by `damp` * mean(diag H)), columns
    taken in decreasing order of H's diagonal, let U be the upper Cholesky factor of H^-1. Column k is quantized to q_k (nearest s_j c_m; 0 when
    pruned; the working value itself for entries kept exact) and the remaining columns absorb its
    error: W[:, k+1:] -= ((W[:, k] - q_k) / U[k, k]) U[k, k+1:], which is the least-squares update
    of the not yet quantized weights for the layer output on the calibration inputs. Returns the
    codes and the working weights (whose values at the exact entries are what to store).
    """
    book, keep_zero = grid.book, grid.keep_zero
    s = np.ones(w.shape[0]) if grid.scale is None else grid.scale.astype(np.float64)
    codes = np.zeros(w.shape, np.int64)
    work = w.copy()
    for g, h in enumerate(hessians.hessians):
        rows = np.flatnonzero(hessians.group_of_channel == g)
        k_count = w.shape[1]
        order, u = hessians.feedback(g, damp)
        sub = work[rows][:, order]
        kept_g, exact_g = kept[rows][:, order], exact[rows][:, order]
        for lo in range(0, k_count, block):  # lazy batch updates: rank-1 inside a block, one GEMM after it
            hi = min(lo + block, k_count)
            err = np.zeros((rows.size, hi - lo))
            for k in range(lo, hi):
                col = sub[:, k]
                c = nearest_codes(normalize(col[:, None], s[rows])[:, 0], book, keep_zero=keep_zero)
                q = np.where(kept_g[:, k], book[c] * s[rows], 0.0)
                q = np.where(exact_g[:, k], col, q)
                codes[rows, order[k]] = c
                err[:, k - lo] = (col - q) / u[k, k]
                sub[:, k + 1:hi] -= np.outer(err[:, k - lo], u[k, k + 1:hi])
            sub[:, hi:] -= err @ u[lo:hi, hi:]
        work[np.ix_(rows, order)] = sub
    return codes, work


def code_normal_equations(codes, coded, s, target, hessians: LayerHessians, k: int) -> tuple[CodeSystem, np.ndarray]:
    """A = sum_j s_j^2 O_j^T H O_j (as a :class:`CodeSystem`) and
    b = sum_j s_j O_j^T H t_j (see refit_under_hessians), O_j the (K, k) indicator of row j's coded entries."""
    b = np.zeros(k)
    for g, h in enumerate(hessians.hessians):
        rows = np.flatnonzero(hessians.group_of_channel == g)
        if rows.size == 0:
            continue
        ht = (target[rows] * s[rows][:, None]) @ h  # row j: s_j (H t_j)^T
        b += np.bincount(codes[rows][coded[rows]], weights=ht[coded[rows]], minlength=k)
    return CodeSystem(codes, coded, s, hessians, k), b


def refit_under_hessians(w, codes, grid: Grid, coded, fixed, hessians: LayerHessians, scale_dtype: str,
                         rounds: int = 1):
    """Codes fixed, centroids then scales by least squares on the layer output error.

    With W_hat = F + s_j sum_m c_m O_jm (O_jm the indicator of row j's coded entries with code m,
    F the exact entries), E(c) = sum_j r_j^T H r_j is quadratic in c: A c = b with
    A_mn = sum_j s_j^2 O_jm^T H O_jn and b_m = sum_j s_j O_jm^T H (w_j - F_j) (code 0 stays 0.0 with
    keep_zero; a ridge of 1e-9 times A's mean entry diagonal, :meth:`CodeSystem.entry_diagonal`, keeps A
    invertible); then each s_j = q_j^T H t_j / q_j^T H q_j with
    q_j = c[codes_j] on the coded entries and t_j = w_j - F_j. Each step lowers E or leaves it. Returns
    the refit (book, scale).
    """
    book, scale, keep_zero = grid.book, grid.scale, grid.keep_zero
    k = book.size
    s = np.ones(w.shape[0]) if scale is None else scale.astype(np.float64)
    target = w - fixed
    free = np.arange(k) >= (1 if keep_zero else 0)
    for _ in range(rounds):
        system, b = code_normal_equations(codes, coded, s, target, hessians, k)
        ridge = 1e-9 * max(float(np.mean(system.entry_diagonal()[free])) if free.any() else 0.0, 1e-30)
        try:
            book = book.copy()
            book[free] = system.solve(b, free, ridge, start=book)
        except np.linalg.LinAlgError:
            pass
        if scale is None:
            continue
        q = np.where(coded, book[codes], 0.0)
        num = np.zeros(w.shape[0])
        den = np.zeros(w.shape[0])
        for g, h in enumerate(hessians.hessians):
            rows = hessians.group_of_channel == g
            qh = q[rows] @ h
            num[rows], den[rows] = np.sum(qh * target[rows], 1), np.sum(qh * q[rows], 1)
        s = store_scale(np.where(den > 0, num / np.where(den > 0, den, 1.0), s), scale_dtype)
    if scale is not None:
        scale = s.astype(np.float16 if use_float16(s, scale_dtype) else np.float32)
    return book, scale


# a codebook of at most this many codes solves its normal equations by conjugate gradients on c -> A c (one C x K
# x K product a step, BLAS: 8-10 steps at 32 codes) instead of forming A (code_gram: C K^2 gathers): 0.22-0.27x
# the CPU s at 32 codes on 384 x 1536, 1536 x 384 and 384 x 384 weights; larger codebooks need more steps
CG_MAX_CODES = 64
CG_TOLERANCE = 1e-12  # relative residual at which the steps stop; past 2 n steps A is formed after all
# ... or once a step lowers the objective by at most this share of what the steps before lowered it: the steps cut
# what is left by ~100x each on these systems (codebooks of share's refits), so the objective is then within about
# this share of its decrease of the optimum, and the centroids (stored in float32) within about float32's precision:
# 5-6 steps a solve instead of 11-16 to the residual tolerance
CG_DECREASE = 1e-10


@dataclass
class CodeSystem:
    """A = sum_j s_j^2 E_j^T H_g(j) E_j for a codebook of n codes with the codes fixed (E_j the one-hot (K, n) of
    row j's `free` entries, rows j in groups g of their Hessians): the left side of a codebook's normal equations
    (:func:`refit_under_hessians`, refine.refine_centroids), applied to a vector without forming it."""

    codes: np.ndarray  # (C, K) ints
    free: np.ndarray  # (C, K) bool: the entries that count
    s: np.ndarray  # (C,) per-row scales
    hessians: LayerHessians
    n: int

    def _groups(self):
        for g, h in enumerate(self.hessians.hessians):
            rows = np.flatnonzero(self.hessians.group_of_channel == g)
            if rows.size:
                yield rows, h

    def times(self, c: np.ndarray) -> np.ndarray:
        """A c = sum_j s_j E_j^T H (s_j E_j c): each row's decoded free entries times H, summed by code."""
        out = np.zeros(self.n)
        for rows, h in self._groups():
            free = self.free[rows]
            decoded = np.where(free, c[self.codes[rows]], 0.0) * self.s[rows, None]
            back = (decoded @ h) * self.s[rows, None]
            out += np.bincount(self.codes[rows][free], weights=back[free], minlength=self.n)
        return out

    def entry_diagonal(self) -> np.ndarray:
        """(n,) sum_j s_j^2 sum of H_kk over row j's free entries k of each code: A's diagonal where H is diagonal
        (what the ridges are relative to, and the steps' preconditioner)."""
        out = np.zeros(self.n)
        for rows, h in self._groups():
            free = self.free[rows]
            d = np.diag(h)[None, :] * np.square(self.s[rows, None])
            out += np.bincount(self.codes[rows][free], weights=np.broadcast_to(d, free.shape)[free], minlength=self.n)
        return out

    def matrix(self) -> np.ndarray:
        """A itself (:func:`code_gram` per group)."""
        a = np.zeros((self.n, self.n))
        for rows, h in self._groups():
            a += code_gram(self.codes[rows], self.free[rows], self.s[rows], h, self.n)
        return a

    def solve(self, rhs: np.ndarray, unknown: np.ndarray, ridge: float, start: np.ndarray | None = None) -> np.ndarray:
        """x on the codes `unknown` ((n,) bool; the others 0) with (A_uu + ridge I) x = rhs_u: Jacobi-preconditioned
        conjugate gradients from `start` up to CG_MAX_CODES codes, else (or if they do not converge) A formed."""
        u = np.flatnonzero(unknown)
        if self.n <= CG_MAX_CODES:
            x = self._gradients(rhs[u], u, ridge, np.zeros(u.size) if start is None else start[u].astype(np.float64))
            if x is not None:
                return x
        return np.linalg.solve(self.matrix()[np.ix_(u, u)] + ridge * np.eye(u.size), rhs[u])

    def _gradients(self, b: np.ndarray, u: np.ndarray, ridge: float, x: np.ndarray) -> np.ndarray | None:
        def apply(v):
            full = np.zeros(self.n)
            full[u] = v
            return self.times(full)[u] + ridge * v
        scale = np.linalg.norm(b)
        if scale == 0:  # A + ridge I is positive definite: x = 0
            return np.zeros_like(x)
        r = b - apply(x)
        if np.linalg.norm(r) <= CG_TOLERANCE * scale:
            return x
        diagonal = self.entry_diagonal()[u] + ridge
        diagonal = np.where(diagonal > 0, diagonal, 1.0)
        z = r / diagonal
        p, rz = z.copy(), float(r @ z)
        lowered = 0.0  # the objective 1/2 x^T (A + ridge) x - b^T x, lowered by the steps so far
        for _ in range(2 * u.size):
            ap = apply(p)
            curvature = float(p @ ap)
            if curvature <= 0:
                return None
            alpha = rz / curvature
            x, r = x + alpha * p, r - alpha * ap
            step = 0.5 * alpha * rz  # what this step lowered the objective by (r.p = r.z in these steps)
            lowered += step
            if np.linalg.norm(r) <= CG_TOLERANCE * scale or step <= CG_DECREASE * lowered:
                return x
            z = r / diagonal
            rz, previous = float(r @ z), rz
            p = z + (rz / previous) * p
        return None


# code_gram gathers H's rows a block of this many columns at a time: the block stays in cache while it is summed
# (the same sums in the same order; 1.6x faster than gathering whole rows at K = 2304 on this machine)
CODE_GRAM_COLUMNS = 128


# from this input row length K (8 column blocks) on, dense rows sum only H's strict upper triangle (E^T H E =
# A + A^T + diag, A = E^T U E): half the gathered entries, for a per-block overhead that smaller K do not repay
# (per row, one thread: 0.56-0.65x at K = 1536, 0.70x at 1024, 0.9x at 768, 1.16x at 384; 256 codes: 0.82x)
CODE_GRAM_TRIANGLE_K = 1024


def code_gram(codes: np.ndarray, free: np.ndarray, s: np.ndarray, h: np.ndarray, n: int) -> np.ndarray:
    """sum_j s_j^2 E_j^T H E_j over rows j, E_j the one-hot (K, n) of row j's free entries S_j.

    Sparse rows (|S_j| small): bincount of H_SS by the code pairs. Dense rows: with S_j sorted by
    code, E_j^T H sums H's rows per code (one contiguous reduction of the gathered rows H_S), then
    that (m, K) matrix's columns per code: O(|S_j| K) additions on rows, O(m |S_j|) on columns,
    for the m codes the row uses (no factor of H, so H needs no jitter). From CODE_GRAM_TRIANGLE_K on,
    the same sums over H's strict upper triangle U and its diagonal (:func:`_upper_code_gram`).
    """
    rows, _ = codes.shape
    g = np.zeros((n, n))
    triangle = None
    for j in range(rows):
        idx = np.flatnonzero(free[j])
        if idx.size == 0:
            continue
        cj = codes[j, idx]
        if idx.size <= 256:
            pair = (cj[:, None] * n + cj[None, :]).ravel()
            g += np.bincount(pair, weights=h[np.ix_(idx, idx)].ravel(), minlength=n * n).reshape(n, n) * s[j] ** 2
            continue
        order = np.argsort(cj, kind="stable")
        cols, sorted_codes = idx[order], cj[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        present = sorted_codes[starts]
        if h.shape[0] >= CODE_GRAM_TRIANGLE_K:
            triangle = triangle or (np.triu(h, 1), np.diag(h).copy())
            g[np.ix_(present, present)] += _upper_code_gram(cols, sorted_codes, starts, *triangle, n) * s[j] ** 2
            continue
        by_code = np.empty((starts.size, h.shape[1]))  # (m, K): E_j^T H, a block of H's columns at a time
        for lo in range(0, h.shape[1], CODE_GRAM_COLUMNS):
            by_code[:, lo:lo + CODE_GRAM_COLUMNS] = np.add.reduceat(h[cols, lo:lo + CODE_GRAM_COLUMNS], starts, axis=0)
        g[np.ix_(present, present)] += np.add.reduceat(by_code[:, cols], starts, axis=1) * s[j] ** 2
    return g


def _upper_code_gram(cols: np.ndarray, sorted_codes: np.ndarray, starts: np.ndarray, upper: np.ndarray,
                     diag: np.ndarray, n: int) -> np.ndarray:
    """E^T H E for one row's entries `cols` (sorted by code, `starts` of each code's run), restricted to the
    codes present, as A + A^T + the diagonal's sums, A = E^T U E: a block of U's columns [lo, hi) gathers only
    the rows k < hi (U[k, l] = 0 for k >= l)."""
    by_code = np.zeros((n, upper.shape[1]))  # E^T U, rows by code
    for lo in range(0, upper.shape[1], CODE_GRAM_COLUMNS):
        below = cols < lo + CODE_GRAM_COLUMNS
        sub, sub_codes = cols[below], sorted_codes[below]
        if sub.size:
            first = np.flatnonzero(np.r_[True, sub_codes[1:] != sub_codes[:-1]])
            by_code[sub_codes[first], lo:lo + CODE_GRAM_COLUMNS] = np.add.reduceat(
                upper[sub, lo:lo + CODE_GRAM_COLUMNS], first, axis=0)
    a = np.add.reduceat(by_code[sorted_codes[starts]][:, cols], starts, axis=1)
    a += a.T
    a[np.diag_indices_from(a)] += np.add.reduceat(diag[cols], starts)
    return a
