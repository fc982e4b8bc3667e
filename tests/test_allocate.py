"""The per-layer allocator on synthetic sensitivity tables, against brute force."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxcompress.numerics.allocate import Option, min_cost, min_size, pareto_front, totals


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


@pytest.mark.parametrize("solver,constrained,objective,scale", [(min_size, "cost", "size", 6.0),
                                                                (min_cost, "size", "cost", 400.0)])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.02, 1.0))
def test_dp_matches_brute_force(solver, constrained, objective, scale, seed, fraction):
    options = table(np.random.default_rng(seed))
    budget = fraction * scale
    chosen = solver(options, budget, resolution=4000)
    want, want_value = brute(options, budget, constrained, objective)
    if want is None:
        assert chosen is None
        return
    size, cost = totals(options, chosen)
    limit, value = (cost, size) if constrained == "cost" else (size, cost)
    assert limit <= budget + 1e-9
    # rounding up may forgo a solution right at the budget: allow one discretization step of slack
    loose, loose_value = brute(options, budget * (1 - 4 / 4000) - 1e-9, constrained, objective)
    assert want_value - 1e-9 <= value <= (loose_value if loose is not None else value) + 1e-9


def test_pareto_front():
    points = [(10, 0.0), (5, 1.0), (7, 0.2), (8, 0.5), (3, 3.0), (5, 2.0)]
    assert pareto_front(points) == [4, 1, 2, 0]
