"""Choosing one setting per layer: a multiple-choice knapsack over measured sizes and costs.

Layer i offers options (size s_ij, cost c_ij), where cost is a measured loss of fidelity that
we treat as additive across layers (it is only approximately so; callers verify end to end).

    minimize  sum_i s_i,choice(i)   subject to  sum_i c_i,choice(i) <= budget      (min_size)
    minimize  sum_i c_i,choice(i)   subject to  sum_i s_i,choice(i) <= size_budget (min_cost)

Both are solved exactly by dynamic programming over the constrained quantity, discretized into
`resolution` steps and rounded UP, so a returned choice never exceeds its budget.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Option:
    size: float  # bytes this layer takes with the option
    cost: float  # measured fidelity loss (e.g. points of top-1 disagreement), >= 0
    settings: dict[str, Any] = field(default_factory=dict, compare=False)


def _solve(options: Sequence[Sequence[Option]], budget: float, resolution: int,
           constrained: str, objective: str) -> list[int] | None:
    """Exact DP: table[u] = least objective with constrained total of u units."""
    if budget < 0 or any(len(layer) == 0 for layer in options):
        return None
    unit = budget / resolution if budget > 0 else 1.0
    inf = math.inf
    best = np.full(resolution + 1, inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for layer in options:
        units = [math.ceil(max(getattr(o, constrained), 0.0) / unit - 1e-9) if budget > 0
                 else (0 if getattr(o, constrained) <= 0 else resolution + 1) for o in layer]
        new = np.full(resolution + 1, inf)
        choice = np.full(resolution + 1, -1, dtype=np.int64)
        for j, (u, option) in enumerate(zip(units, layer)):
            if u > resolution:
                continue
            shifted = np.full(resolution + 1, inf)
            shifted[u:] = best[: resolution + 1 - u] + getattr(option, objective)
            better = shifted < new
            new[better], choice[better] = shifted[better], j
        best = new
        picks.append(choice)
    if not np.isfinite(best).any():
        return None
    u = int(np.argmin(best))
    chosen = []
    for layer, choice in zip(reversed(options), reversed(picks)):
        j = int(choice[u])
        chosen.append(j)
        u -= math.ceil(max(getattr(layer[j], constrained), 0.0) / unit - 1e-9) if budget > 0 else 0
    return chosen[::-1]


def min_size(options: Sequence[Sequence[Option]], budget: float, resolution: int = 2000) -> list[int] | None:
    """Index of the chosen option per layer: least total size with total cost <= budget (None: infeasible)."""
    return _solve(options, budget, resolution, "cost", "size")


def min_cost(options: Sequence[Sequence[Option]], size_budget: float, resolution: int = 2000) -> list[int] | None:
    """Index of the chosen option per layer: least total cost with total size <= size_budget."""
    return _solve(options, size_budget, resolution, "size", "cost")


def totals(options: Sequence[Sequence[Option]], chosen: Sequence[int]) -> tuple[float, float]:
    """(total size, total cost) of a choice."""
    return (sum(layer[j].size for layer, j in zip(options, chosen)),
            sum(layer[j].cost for layer, j in zip(options, chosen)))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (size, loss) points no other point beats on both, by increasing size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_loss = [], math.inf
    for i in order:
        if points[i][1] < best_loss:
            front.append(i)
            best_loss = points[i][1]
    return front
