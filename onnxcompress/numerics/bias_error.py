"""A bias's coding error, measured where it lands and cancelled by the weights beside it.

A layer adds its bias to every output row: y_j = (W x)_j + b_j (Conv, Gemm; a recurrent node adds
W x_t + R h_{t-1} + Wb + Rb to its gates at every step). Coding the bias adds the same e_j = b_j -
b_hat_j to every sample, position and time step, so its squared error per input row is sum_j e_j^2,
against the layer's output signal sum tr(W H W^T) (H = E[x x^T] of the input rows), not against
|b|^2 as a weight-space measure would have it.

The weights can cancel most of it. With mu = E[x], the change of row j that best offsets e_j,
argmin_d E[(d^T x + e_j)^2], is d = e_j v with v = H^-1 mu: code W' = W + e v^T instead of W.
Exactly (the cross term vanishes because E[x (1 - v^T x)] = mu - H v = 0):

    E|(W - W_hat) x + e|^2 = tr((W' - W_hat) H (W' - W_hat)^T) + sum_j e_j^2 (1 - rho),

rho = mu^T H^-1 mu in [0, 1] (H - mu mu^T is a covariance): the share of a constant that the
inputs can reproduce. After a ReLU, rho is near 1; a layer whose inputs have zero mean cancels
nothing. So a bias is coded first, measured by its residual e^2 (1 - rho), and its layer's weight
is then coded toward W' (:func:`absorbing_target`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcompress.numerics.gptq import LayerHessians

# ridge on H when solving H v = mu, relative to mean(diag H) (GPTQ's default damping): with fewer
# input rows than inputs, H is singular, mu lies in its range and the undamped v would cancel a
# constant exactly on the calibration rows only
DAMP = 0.01


@dataclass(frozen=True)
class BiasLink:
    """Where a bias lands: the output rows of its layer's weights, and how much of it they can cancel."""

    absorber: str | None  # the weight coded toward W + e v^T (the layer's with the largest rho); None: none
    rows: np.ndarray  # (bias size,) the output row (channel-first row of the weights) each entry adds to
    rho: np.ndarray  # (rows,) mu^T H^-1 mu of the absorber's inputs, per output row
    signal: float  # sum over the layer's weights of tr(W H W^T): the output signal per input row
    weights: tuple[str, ...] = ()  # the layer's weights, whose outputs the bias adds to

    def row_error(self, error: np.ndarray) -> np.ndarray:
        """e per output row: the bias entries landing on the same row add up (a recurrent Wb + Rb)."""
        return np.bincount(self.rows, np.asarray(error, np.float64).ravel(), minlength=self.rho.size)

    def noise(self, error: np.ndarray) -> float:
        """sum_j e_j^2 (1 - rho_j): the output error left once the absorber has cancelled its share."""
        e = self.row_error(error)
        return float(np.sum(e * e * (1.0 - self.rho)))


def mean_solutions(hessians: LayerHessians) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Per group v_g = (H_g + DAMP * mean(diag H_g) I)^-1 mu_g, and per output row the share rho of a
    constant error it cancels: 1 - E[(1 - v^T x)^2] = 2 mu^T v - v^T H v (= mu^T H^-1 mu undamped).

    None when the input means were not measured.
    """
    if hessians.means is None:
        return None
    solutions, rho_g = [], []
    for h, mu in zip(hessians.hessians, hessians.means):
        ridge = DAMP * max(float(np.mean(np.diag(h))), 1e-30)
        v = np.linalg.solve(h + ridge * np.eye(h.shape[0]), mu)
        solutions.append(v)
        rho_g.append(float(np.clip(2 * mu @ v - v @ h @ v, 0.0, 1.0)))
    return solutions, np.asarray(rho_g)[hessians.group_of_channel]


def absorbing_target(matrix: np.ndarray, row_error: np.ndarray, hessians: LayerHessians) -> np.ndarray:
    """W' = W + e v^T, rows of group g with that group's v (channel-first (C, K) matrices)."""
    solved = mean_solutions(hessians)
    if solved is None:
        return matrix
    solutions, _ = solved
    v = np.stack([solutions[g] for g in hessians.group_of_channel])
    return matrix + row_error[:, None] * v
