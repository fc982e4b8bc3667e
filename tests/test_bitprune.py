"""The bit-width search's pruner: sparsegpt's factor made once for a weight's sparsities."""
import numpy as np

import onnxcompress.passes.bitprune as bitprune
from onnxcompress.graph.data import load_data
from onnxcompress.graph.weights import find_weights, get_array
from onnxcompress.numerics import refine
from tiny import gemm, random_feeds


def _data(model, n):
    return load_data({k: v for k, v in random_feeds(model, n=n, seed=0).items()})


def _fits(pruner, array, info):
    """Every fit the search asks of one weight: the predicted sweep's, then the measured (cross-fitted) ones."""
    fits = []
    for sparsity in (0.5, 0.7, 0.9):
        fits += pruner(array, info, sparsity, all_rows=True)[0]
        fits += pruner(array, info, sparsity)[0]
    return fits


def test_sparsegpt_factors_are_made_once_per_gram_and_damping_for_all_sparsities(monkeypatch):
    model = gemm(k=32, n=12)
    data = _data(model, 256)
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    array = get_array(model, info)
    made = []
    make = refine.sparsegpt_factor

    def counted(h, damping=0.01):
        made.append((hash(h.tobytes()), damping))
        return make(h, damping)

    monkeypatch.setattr(bitprune, "sparsegpt_factor", counted)
    monkeypatch.setattr(refine, "sparsegpt_factor", counted)  # sparsegpt's own, when given none
    cached = bitprune.Pruner(model, data, [info], crossfit=True)
    cached.max_flops = 0  # sparsegpt, not the exact least squares
    fits = _fits(cached, array, info)
    assert len(fits) > 6  # cross-fitted at some sparsity: a fit on the rows outside each fold
    assert len(made) == len(set(made)) >= 2  # each (Gram, damping) once, whatever the sparsity
    # the same fits as factors made afresh each time
    monkeypatch.setattr(bitprune, "FACTOR_CACHE_BYTES", 0)
    fresh = bitprune.Pruner(model, data, [info], crossfit=True)
    fresh.max_flops = 0
    made.clear()
    again = _fits(fresh, array, info)
    assert len(made) > len(set(made))
    for a, b in zip(fits, again):
        np.testing.assert_array_equal(a, b)


def test_only_the_current_weights_factors_are_kept(monkeypatch):
    model = gemm(k=32, n=12)
    data = _data(model, 256)
    infos = [w for w in find_weights(model, min_elements=0)]
    pruner = bitprune.Pruner(model, data, infos)
    pruner.max_flops = 0
    pruner.held_out_ridge = False
    info = next(w for w in infos if len(w.shape) == 2)
    pruner(get_array(model, info), info, 0.5)
    assert {k[0] for k in pruner._factors} == {info.name}
    h = np.eye(4)
    pruner._factor(("other", None), 0, h, 0.01)
    assert {k[0] for k in pruner._factors} == {"other"}
    monkeypatch.setattr(bitprune, "FACTOR_CACHE_BYTES", h.nbytes)  # one fits: the first made stays
    pruner._factor(("other", 0), 0, h, 0.01)
    assert list(pruner._factors) == [("other", None, 0, 0.01)]


def test_a_weight_whose_fold_factors_overflow_the_cache_is_fit_fold_by_fold_with_each_factor_made_once(monkeypatch):
    model = gemm(k=96, n=12)
    data = _data(model, 256)
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    array = get_array(model, info)
    made, alive = [], []
    make = refine.sparsegpt_factor

    def counted(h, damping=0.01):
        made.append((hash(h.tobytes()), damping))
        return make(h, damping)

    monkeypatch.setattr(bitprune, "sparsegpt_factor", counted)
    sparsities = (0.5, 0.7, 0.8)
    whole = bitprune.Pruner(model, data, [info], crossfit=True, sparsities=sparsities)
    whole.max_flops = 0  # sparsegpt, not the exact least squares
    expected = [whole(array, info, s)[0] for s in sparsities]
    assert all(len(fits) == whole.folds for fits in expected)  # cross-fitted at every sparsity
    assert len(made) == len(set(made)) == whole.folds  # one factor a fold, kept for the other sparsities
    # a cache of one factor: the weight's four do not fit, so the first call fits all sparsities fold by fold
    monkeypatch.setattr(bitprune, "FACTOR_CACHE_BYTES", 96 * 96 * 8)
    made.clear()
    narrow = bitprune.Pruner(model, data, [info], crossfit=True, sparsities=sparsities)
    narrow.max_flops = 0
    factor = narrow._factor

    def watched(*args):
        alive.append(len(narrow._factors))
        return factor(*args)

    monkeypatch.setattr(narrow, "_factor", watched)
    first = narrow(array, info, sparsities[0])[0]
    assert len(made) == len(set(made)) == narrow.folds and max(alive) <= 1  # each fold's made once, one kept at a time
    assert all(narrow._cache[(info.name, s)].folds is not None for s in sparsities)
    got = [first] + [narrow(array, info, s)[0] for s in sparsities[1:]]
    assert len(made) == narrow.folds  # the other sparsities' fits were made with the first
    for a, b in zip(expected, got):  # the same fits, bit for bit
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
