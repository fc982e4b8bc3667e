"""Layer-wise least squares for pruning compensation and centroid refinement (pure numpy).

A linear layer (see :mod:`onnxcompress.runtime.capture`) computes ``out[:, j] = X_g(j) w_j`` for output
channel j, with X_g the (rows, K) input rows of the channel's group. Compression changes both
the weights (w -> w') and, through earlier layers, the inputs (X_r of the reference model ->
X_c of the current one). Everything here minimises the squared output error of one layer

    E(w') = sum_j || X_c w'_j - X_r w_j ||^2
          = sum_j  w'_j^T H w'_j - 2 w'_j^T C w_j + w_j^T R w_j

which needs only three K x K Gram matrices per group: H = X_c^T X_c, C = X_c^T X_r,
R = X_r^T X_r (all divided by the number of rows). With X_c = X_r, C = R = H.

Setting the gradient to zero without constraints gives the dense target w* = H^{-1} C w, and
E(w') = sum_j (w'_j - w*_j)^T H (w'_j - w*_j) + const: every constrained fit below (a sparsity
mask, a codebook) is a fit of w* in the metric H. Damping adds lambda ||w' - w*||^2 with
lambda = damping * mean(diag H), which keeps every solve well posed when inputs are degenerate
(dead ReLUs, constant pixels).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxcompress.numerics.blas import one_blas_thread
from onnxcompress.numerics.gptq import CodeSystem, LayerHessians

def damped(gram: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """(H + lambda I, lambda) with lambda = damping * mean(diag H) (at least a tiny positive floor)."""
    lam = float(damping) * float(np.mean(np.diag(gram))) if gram.size else 0.0
    lam = max(lam, 1e-12)
    h = np.array(gram, dtype=np.float64)  # a copy with lambda added on its diagonal: no K x K identity beside it
    h[np.diag_indices_from(h)] += lam
    return h, lam


def dense_target(weight: np.ndarray, gram: np.ndarray, cross: np.ndarray | None, *,
                 damping: float = 0.01) -> np.ndarray:
    """Rows w*_j = w_j + (H + lambda I)^{-1} (C - H) w_j: the best dense weights on the current inputs.

    weight: (rows, K) reference weights w_j; gram: H; cross: C (None: C = H, then w* = w exactly).
    Written as a correction of w so that the damping pulls toward the reference weights, not 0.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if cross is None:
        return weight.copy()
    delta = (cross - gram) @ weight.T  # (K, rows); before the damped copy: C - H and H + lambda I not alive at once
    h, _ = damped(gram, damping)
    return weight + np.linalg.solve(h, delta).T


def with_bias(gram: np.ndarray, cross: np.ndarray | None, ref_gram: np.ndarray | None, mean_c: np.ndarray,
              mean_r: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gram matrices of the rows extended by a constant 1, which makes the bias one more weight column.

    With X' = [X, 1]: H' = [[H, m_c], [m_c^T, 1]], C' = [[C, m_c], [m_r^T, 1]], R' = [[R, m_r], [m_r^T, 1]]
    (m the mean input rows). Without a reference (cross None) X_r = X_c and only H' is built.
    """
    def extend(m, left, right):
        k = m.shape[0]
        out = np.empty((k + 1, k + 1))
        out[:k, :k], out[:k, k], out[k, :k], out[k, k] = m, left, right, 1.0
        return out
    h = extend(gram, mean_c, mean_c)
    if cross is None:
        return h, None, None
    return h, extend(cross, mean_c, mean_r), extend(ref_gram, mean_r, mean_r)


def masked_lstsq(target: np.ndarray, keep: np.ndarray, gram: np.ndarray, *, damping: float = 0.01) -> np.ndarray:
    """Refit each row on its kept entries: w'_S = argmin (w' - w*)^T H (w' - w*) + lambda ||w'_S - w*_S||^2.

    With S the kept set of row j and w'_{not S} = 0 the normal equations are
        (H_SS + lambda I) w'_S = (H w*)_S + lambda w*_S.
    target: (rows, K) w*; keep: (rows, K) bool. Rows sharing one kept set are solved together.
    Returns (rows, K) float64 with exact zeros outside `keep`.
    """
    target = np.asarray(target, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    h, lam = damped(gram, damping)
    rhs = target @ gram + lam * target  # row j: (H w*_j + lambda w*_j)^T  (H symmetric)
    out = np.zeros_like(target)
    patterns: dict[bytes, list[int]] = {}
    for j in range(target.shape[0]):
        patterns.setdefault(np.packbits(keep[j]).tobytes(), []).append(j)
    with one_blas_thread():
        for rows in patterns.values():
            s = np.flatnonzero(keep[rows[0]])
            if s.size == 0:
                continue
            sub = h[np.ix_(s, s)]
            out[np.ix_(rows, s)] = np.linalg.solve(sub, rhs[np.ix_(rows, s)].T).T
    return out


DEFAULT_DAMPING = 0.01  # "auto" damping where the held-out choice is not made
MAX_CV_FLOPS = 2e10  # "auto" damping: the held-out refits of a layer may cost this many flops
DAMPING_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def heldout_damping(reference: np.ndarray, keep: np.ndarray, folds: Sequence[tuple], *,
                    grid: Sequence[float] = DAMPING_GRID) -> np.ndarray:
    """Two-fold held-out output error of the masked refit at each damping of `grid`.

    folds: ((H, C, R) of rows A, (H, C, R) of rows B); C and R may be None (X_r = X_c). The
    refit (dense target, then masked least squares) is fit on one fold and its output error
    measured on the other, both ways. With few calibration rows per input (fc layers on a few
    hundred samples) a small damping fits the calibration rows and not the data they stand
    for; the error on rows the fit did not see says how much damping generalizes.
    Returns the summed held-out error per damping value.
    """
    errors = np.zeros(len(grid))
    for train, test in ((folds[0], folds[1]), (folds[1], folds[0])):
        h, c, _ = train
        for i, lam in enumerate(grid):
            fitted = masked_lstsq(dense_target(reference, h, c, damping=lam), keep, h, damping=lam)
            errors[i] += output_error(fitted, reference, *test)[0]
    return errors


def damping_for_all_rows(errors: np.ndarray, grid: Sequence[float] = DAMPING_GRID) -> float:
    """The damping for a fit on all rows, from the held-out errors of :func:`heldout_damping`.

    Each fold holds half the rows, and the best ridge relative to mean(diag H) falls about as
    1 / rows, so the fit on all rows takes half the grid value that did best on the folds.
    """
    return float(grid[int(np.argmin(errors))]) / 2


def lstsq_cost(keep: np.ndarray) -> float:
    """Approximate flops of :func:`masked_lstsq`: sum over rows of |S_j|^3 / 3."""
    kept = np.asarray(keep, dtype=bool).sum(axis=1).astype(np.float64)
    return float(np.sum(kept ** 3) / 3)


SPARSEGPT_BLOCK = 128  # columns over which SparseGPT chooses each row's own mask


def sparsegpt_factor(gram: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """U, the upper Cholesky factor of (H + lambda I)^{-1} (dead inputs, diag H = 0, given 1) that
    :func:`sparsegpt` uses: the same for every mask, so fits of one layer at several sparsities may share it."""
    h, _ = damped(gram, damping)
    dead = np.diag(gram) == 0
    h[dead, dead] = 1.0
    inverse = np.linalg.inv(h)
    del h  # one K x K fewer alive in the Cholesky factorization (382 MB at K = 6912)
    return np.linalg.cholesky(inverse).T  # upper: inv(H) = U^T U


def sparsegpt(target: np.ndarray, gram: np.ndarray, *, keep: np.ndarray | None = None,
              sparsity: float | None = None, damping: float = 0.01, block: int = SPARSEGPT_BLOCK,
              factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """OBS pruning column by column (Frantar & Alistarh, SparseGPT, 2023) in the metric H.

    With U the upper Cholesky factor of (H + lambda I)^{-1}, column i is frozen (kept value or
    0) and the error e = (w_i - q_i) / U_ii is spread over the later columns: W[:, i:] -= e U[i, i:],
    the optimal (OBS) update for removing the column's freedom. Without `keep`, the mask is
    chosen per block of `block` columns: in each row, the `sparsity` fraction of entries with the
    smallest w_i^2 / U_ii^2 (the OBS saliency) is pruned.
    Returns (weights with exact zeros, keep mask).
    """
    if (keep is None) == (sparsity is None):
        raise ValueError("give exactly one of keep and sparsity")
    w = np.array(target, dtype=np.float64)
    rows, k = w.shape
    w[:, np.diag(gram) == 0] = 0.0
    u = sparsegpt_factor(gram, damping) if factor is None else factor  # `factor`: sparsegpt_factor's, made before
    mask_out = np.zeros((rows, k), dtype=bool) if keep is None else np.asarray(keep, dtype=bool).copy()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        if keep is None:
            score = w1 ** 2 / np.diag(u1)[None, :] ** 2
            n_prune = int(round((i2 - i1) * sparsity))
            order = np.argsort(score, axis=1, kind="stable")
            kept1 = np.ones_like(w1, dtype=bool)
            np.put_along_axis(kept1, order[:, :n_prune], False, axis=1)
            mask_out[:, i1:i2] = kept1
        else:
            kept1 = mask_out[:, i1:i2]
        with one_blas_thread():
            for i in range(i2 - i1):
                col = w1[:, i]
                q = np.where(kept1[:, i], col, 0.0)
                e = (col - q) / u1[i, i]
                w1[:, i:] -= np.outer(e, u1[i, i:])
                w1[:, i] = q
                err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return np.where(mask_out, w, 0.0), mask_out


def output_error(weight: np.ndarray, reference: np.ndarray, gram: np.ndarray, cross: np.ndarray | None = None,
                 ref_gram: np.ndarray | None = None) -> tuple[float, float]:
    """(error, signal) = (sum_j ||X_c w'_j - X_r w_j||^2, sum_j ||X_r w_j||^2) per row of data.

    error = sum_j w'^T H w' - 2 w'^T C w + w^T R w, signal = sum_j w^T R w (C, R default to H).
    """
    wq = np.asarray(weight, dtype=np.float64)
    wr = np.asarray(reference, dtype=np.float64)
    cross = gram if cross is None else cross
    ref_gram = gram if ref_gram is None else ref_gram
    signal = float(np.sum((wr @ ref_gram) * wr))
    error = float(np.sum((wq @ gram) * wq)) - 2 * float(np.sum((wq @ cross) * wr)) + signal
    return max(error, 0.0), signal


def refine_centroids(target: np.ndarray, codes: np.ndarray, centroids: np.ndarray, hessians: LayerHessians, *,
                     scale: np.ndarray | None = None, fixed: Sequence[int] = (), ridge: float = 1e-3,
                     free_mask: np.ndarray | None = None) -> np.ndarray:
    """Least-squares centroids: the layer output is linear in the codebook.

    Row j of the shared weight is w'_j = s_j sum_c c_c e_{j,c} (e_{j,c} the 0/1 indicator of the
    entries of row j with code c, s_j an optional per-row scale). The output error
    sum_j ||X_c w'_j - X_r w_j||^2 is quadratic in c: minimise c^T G c - 2 b^T c with
        G[c, c'] = sum_j s_j^2 e_{j,c}^T H_g(j) e_{j,c'}
        b[c]     = sum_j s_j   e_{j,c}^T C_g(j) w_j
    (H, C the current/cross Gram matrices of the row's group, `hessians.hessians` and `hessians.crosses`;
    C = H when there are no crosses). Centroids in `fixed` (e.g. the exact 0 of pruned entries) keep their
    value and move to the right-hand side; a ridge of `ridge` times G's mean entry diagonal (sum_j s_j^2 H_kk
    over the code's entries: CodeSystem.entry_diagonal, G's diagonal where H is diagonal) pulls the free
    centroids toward their k-means values, and a centroid no entry uses keeps its value. Entries outside
    `free_mask` (e.g. pruned ones, whose code is a fixed centroid anyway) are ignored. G is applied to
    vectors (CodeSystem.solve), formed only for large codebooks.

    target: (rows, K) reference weights w_j; codes: (rows, K) ints into `centroids`.
    Returns the refined centroids (float64, same shape as `centroids`).
    """
    codes = np.asarray(codes, dtype=np.int64)
    c0 = np.asarray(centroids, dtype=np.float64).copy()
    n = c0.size
    rows, _ = codes.shape
    s = np.ones(rows) if scale is None else np.asarray(scale, dtype=np.float64).reshape(rows)
    fixed_set = np.zeros(n, dtype=bool)
    fixed_set[list(fixed)] = True
    free_entries = ~fixed_set[codes]
    if free_mask is not None:
        free_entries &= np.asarray(free_mask, dtype=bool)
    system, b = _centroid_equations(np.asarray(target, dtype=np.float64), codes, c0, s, free_entries, hessians)
    used = np.bincount(codes[free_entries], minlength=n) > 0
    free = used & ~fixed_set
    if not free.any():
        return c0
    diagonal = system.entry_diagonal()[free]
    lam = ridge * float(np.mean(diagonal))
    lam = max(lam, 1e-12 * max(float(np.max(diagonal)), 1e-30))
    out = c0.copy()
    out[free] = system.solve(b + lam * c0, free, lam, start=c0)
    return out


def _centroid_equations(target: np.ndarray, codes: np.ndarray, c0: np.ndarray, s: np.ndarray,
                        free_entries: np.ndarray, hessians: LayerHessians) -> tuple[CodeSystem, np.ndarray]:
    """(G as a CodeSystem, b) of :func:`refine_centroids` summed over the groups of rows, b less the pull of the
    entries that keep their value (not free): -G[free, fixed] c_fixed."""
    n = c0.size
    b = np.zeros(n)
    group_of_rows = np.asarray(hessians.group_of_channel)
    for grp in np.unique(group_of_rows):
        sel = np.flatnonzero(group_of_rows == grp)
        h = np.asarray(hessians.hessians[grp], dtype=np.float64)
        cross = h if hessians.crosses is None else np.asarray(hessians.crosses[grp], dtype=np.float64)
        rhs = target[sel] @ cross.T  # row j: (C w_j)^T
        w_fixed = np.where(free_entries[sel], 0.0, c0[codes[sel]]) * s[sel, None]
        fixed_out = w_fixed @ h  # (H w_fixed)^T
        contrib = (rhs - fixed_out) * s[sel, None]
        b += np.bincount(codes[sel][free_entries[sel]], weights=contrib[free_entries[sel]], minlength=n)
    return CodeSystem(codes, free_entries, s, hessians, n), b
