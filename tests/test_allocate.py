"""The per-layer allocator on synthetic sensitivity tables, against brute force."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxcompress.allocate import Option, min_cost, min_size, pareto_front, totals


def brute(options, budget, constrained, objective):
    best, best_value = None, np.inf
    for combo in itertools.product(*(range(len(layer)) for layer in options)):
        size, cost = totals(options, combo)
        limit, value = (cost, size) if constrained == "cost" else (size, cost)
        if limit <= budget + 1e-12 and value < best_value - 1e-12:
            best, best_value = combo, value
    return best, best_value


def table(rng, layers=4, per_layer=5):
    """Per layer: bigger options cost less, like more bits."""
    options = []
    for _ in range(layers):
        sizes = np.sort(rng.uniform(1, 100, per_layer))
        costs = np.sort(rng.uniform(0, 2, per_layer))[::-1]
        options.append([Option(float(s), float(c), {"k": k}) for k, (s, c) in enumerate(zip(sizes, costs))])
    return options


def test_known_optimum():
    # layer A: 8 bits (size 8, cost 0) or 4 bits (size 4, cost 1); layer B: 8 bits (8, 0) or 2 bits (2, 0.5)
    options = [[Option(8, 0), Option(4, 1.0)], [Option(8, 0), Option(2, 0.5)]]
    assert min_size(options, 0.6) == [0, 1]
    assert min_size(options, 1.6) == [1, 1]
    assert min_size(options, 0.0) == [0, 0]
    assert min_cost(options, 10) == [0, 1]
    assert min_cost(options, 5.9) is None


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.floats(0.1, 6.0))
def test_min_size_matches_brute_force(seed, budget):
    options = table(np.random.default_rng(seed))
    chosen = min_size(options, budget, resolution=4000)
    want, want_size = brute(options, budget, "cost", "size")
    if want is None:
        assert chosen is None
        return
    size, cost = totals(options, chosen)
    assert cost <= budget + 1e-9
    # rounding costs up may forgo a solution that sits right at the budget: allow one unit of slack
    loose, loose_size = brute(options, budget * (1 - 4 / 4000) - 1e-9, "cost", "size")
    assert want_size - 1e-9 <= size <= (loose_size if loose is not None else size) + 1e-9


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.floats(10, 400))
def test_min_cost_matches_brute_force(seed, size_budget):
    options = table(np.random.default_rng(seed))
    chosen = min_cost(options, size_budget, resolution=4000)
    want, want_cost = brute(options, size_budget, "size", "cost")
    if want is None:
        assert chosen is None
        return
    size, cost = totals(options, chosen)
    assert size <= size_budget + 1e-9
    loose, loose_cost = brute(options, size_budget * (1 - 4 / 4000) - 1e-9, "size", "cost")
    assert want_cost - 1e-9 <= cost <= (loose_cost if loose is not None else cost) + 1e-9


def test_pareto_front():
    points = [(10, 0.0), (5, 1.0), (7, 0.2), (8, 0.5), (3, 3.0), (5, 2.0)]
    assert pareto_front(points) == [4, 1, 2, 0]
