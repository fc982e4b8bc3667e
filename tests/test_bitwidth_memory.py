"""What the bit-width search holds in memory: the evaluator's model, suffix sessions, the pruner's statistics."""
import numpy as np
import onnx
from onnx import helper, numpy_helper

import tiny
from tiny import gemm, random_feeds


def _with_a_constant_weight() -> onnx.ModelProto:
    """x -> MatMul A -> Add c -> MatMul B (a Constant node) -> Mul s (a small initializer kept in the graph)."""
    rng = np.random.default_rng(0)
    a = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "A")
    c = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "c")
    s = numpy_helper.from_array(np.float32(0.5), "s")
    b = helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(
        rng.standard_normal((16, 4)).astype(np.float32)))
    nodes = [helper.make_node("MatMul", ["x", "A"], ["m"]), helper.make_node("Add", ["m", "c"], ["h"]), b,
             helper.make_node("MatMul", ["h", "B"], ["y0"]), helper.make_node("Mul", ["y0", "s"], ["y"])]
    return tiny.make_model(nodes, [tiny.value("x", ["N", 8])], [tiny.value("y", ["N", 4])], [a, c, s])


def test_weights_as_inputs_removes_the_searched_weights_in_place_and_declares_them_as_inputs():
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitsearch import weights_as_inputs

    model = _with_a_constant_weight()
    before = model.SerializeToString()
    weights = [w for w in find_weights(model, min_elements=0) if w.name in ("B", "A", "c")]
    assert {w.location for w in weights} == {"initializer", "constant"}
    made = weights_as_inputs(model, weights)
    assert model.SerializeToString() == before  # the model given is not touched
    assert [t.name for t in made.graph.initializer] == ["s"]  # the rest kept, in order
    assert [n.op_type for n in made.graph.node] == ["MatMul", "Add", "MatMul", "Mul"]  # the Constant node gone
    assert [i.name for i in made.graph.input] == ["x"] + [w.name for w in weights]  # in the weights' order
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in made.graph.input[1:])
    onnx.checker.check_model(made, full_check=True)
    feeds = random_feeds(model, n=4, seed=1)
    arrays = {"A": numpy_helper.to_array(model.graph.initializer[0]), "c": numpy_helper.to_array(model.graph.initializer[1]),
              "B": numpy_helper.to_array(model.graph.node[2].attribute[0].t)}
    np.testing.assert_array_equal(tiny.run(made, {**feeds, **arrays})[0], tiny.run(model, feeds)[0])


def test_a_session_without_arena_gives_the_same_outputs_and_suffix_sessions_take_none():
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitsearch import Evaluator
    from onnxcompress.runtime.sessions import make_session

    model = gemm(k=32, n=8)
    feeds = random_feeds(model, n=8, seed=2)
    with_arena, without = make_session(model), make_session(model, arena=False)
    assert with_arena.get_session_options().enable_cpu_mem_arena
    assert not without.get_session_options().enable_cpu_mem_arena
    np.testing.assert_array_equal(with_arena.run(None, feeds)[0], without.run(None, feeds)[0])

    from test_bitwidth import _chain
    chain = _chain()
    data = Dataset(stacked=random_feeds(chain, n=64, seed=1))
    weights = [w for w in find_weights(chain, min_elements=0) if w.name == "W2"]
    evaluator = Evaluator(chain, weights, data, lambda *a: {}, suffix_min_elements=0)
    evaluator.outputs({"W2": [evaluator.base["W2"] * 2]})
    assert not evaluator._suffix["W2"].session.get_session_options().enable_cpu_mem_arena


def test_the_pruners_statistics_keep_no_raw_rows_and_the_same_gram_matrices():
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.passes.bitprune import Pruner
    from onnxcompress.runtime.capture import collect_layer_inputs, linear_layer
    from test_bitwidth import tiny_data

    model = gemm(k=64, n=16)
    data = load_data(tiny_data(model, n=256))
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    pruner = Pruner(model, data, [info])
    full = collect_layer_inputs(model, data, [linear_layer(model, info)], folds=Pruner.folds)[info.name]
    stats = pruner.stats[info.name]
    assert stats.rows[0].shape[0] == 0 and full.rows[0].shape[0] > 0
    np.testing.assert_array_equal(stats.hessian(0), full.hessian(0))
    assert all(np.array_equal(a, b) for a, b in zip(stats.heldout_hessians(0), full.heldout_hessians(0)))


def test_the_search_lets_go_of_its_pruner_when_it_is_done():
    from onnxcompress.passes.bitwidth import BitWidthPass
    from test_bitwidth import tiny_data

    model = gemm(k=32, n=8)
    pass_ = BitWidthPass(max_drop=1.0, bits=[8, 4], sparsities=[0.0, 0.5])
    from onnxcompress.graph.data import load_data

    tiny.run_pass(pass_, model, load_data(tiny_data(model, n=64)))
    assert pass_._pruner is None


def _two_layers_with_biases(seed: int = 0) -> onnx.ModelProto:
    """x [N, 16] -> MatMul W1 [16, 32] + b1 -> Relu -> MatMul W2 [32, 8] + b2 -> y (class scores)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W1", (16, 32)), ("b1", (32,)), ("W2", (32, 8)), ("b2", (8,)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    return tiny.make_model(nodes, [tiny.value("x", ["N", 16])], [tiny.value("y", ["N", 8])], inits)


def test_the_smallest_weights_single_candidates_are_measured_in_one_run_the_first_carrying_its_cost(monkeypatch):
    from onnxcompress import api
    from onnxcompress.passes import bitpredict
    from onnxcompress.passes.bitsearch import Evaluator
    from onnxcompress.recipes import Recipe

    monkeypatch.setattr(bitpredict, "SMALL_SHARE", 0.05)  # b1 and b2: 160 of 2,720 bytes
    calls = []
    real = Evaluator.measure
    monkeypatch.setattr(Evaluator, "measure", lambda self, changed: (calls.append(sorted(changed)), real(self, changed))[1])
    model = _two_layers_with_biases()
    x = np.random.default_rng(1).standard_normal((96, 16)).astype(np.float32)
    recipe = Recipe("t", [("bitwidth", {"max_drop": 2.0, "unlabelled": "agreement", "sweep": "predicted",
                                        "bits": [2, 3, 4], "sparsities": [0.0, 0.5, 0.8], "min_elements": 8})])
    _, report = api.compress(model, recipe, {"x": x}, eval_data={"x": x})
    summary = report.passes[0].summary
    assert ["b1", "b2"] in calls  # one run with both changed
    assert ["b1"] not in calls and ["b2"] not in calls  # and none with either alone
    (b1,), (b2,) = summary["sensitivity"]["b1"], summary["sensitivity"]["b2"]
    assert b1["group"] == b2["group"] == "b1" and (b1["bits"], b1["sparsity"]) == (4, 0.0)
    assert b1["nsr"] > 0 and b2["nsr"] == b2["cost"] == b2["task_nsr"] == 0.0  # the group's noise counted once
    assert b1["size"] > 0 and b2["size"] > 0
    assert all(c["group"] is None for name in ("W1", "W2") for c in summary["sensitivity"][name])
    assert summary["choices"]["b1"] == {"bits": 4, "sparsity": 0.0}


def test_the_sweeps_anchors_skip_entries_already_measured():
    from onnxcompress.passes import bitpredict
    from onnxcompress.passes.bitsearch import Candidate

    entries = [[bitpredict.Entry(Candidate(0.0, 8), 0.01, measured=True)], [bitpredict.Entry(Candidate(0.0, 8), 0.02)]]
    measured = []

    def measure(i, j):
        measured.append((i, j))
        entries[i][j].candidate.cost = entries[i][j].candidate.nsr = 0.1

    bitpredict.sweep(entries, measure, lambda options, noise: [], lambda: False, 1.0)
    assert measured == [(1, 0)]


def test_a_sample_of_rows_is_fit_once_for_every_width_and_codes_as_a_fresh_fit(monkeypatch):
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights, get_array
    from onnxcompress.numerics import refine
    from onnxcompress.passes.bitprune import Pruner, sampled_candidate
    from test_bitwidth import tiny_data

    model = gemm(k=64, n=40)
    data = load_data(tiny_data(model, n=256))
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    array = get_array(model, info)
    rows = np.array([0, 3, 17, 39])
    pruner = Pruner(model, data, [info])
    fits = []
    import onnxcompress.passes.bitprune as bp
    monkeypatch.setattr(bp, "masked_lstsq", lambda *a, **k: fits.append(1) or refine.masked_lstsq(*a, **k))
    coded = [sampled_candidate(array, info, 0.5, bits, 0, pruner, rows) for bits in (8, 4, 2)]
    fresh = [sampled_candidate(array, info, 0.5, bits, 0, Pruner(model, data, [info]), rows) for bits in (8, 4, 2)]
    assert len(fits) == 1 + 3  # this pruner fit the rows once for three widths; the fresh ones once each
    for a, b in zip(coded, fresh):
        np.testing.assert_array_equal(a.decode(), b.decode())
    other = np.array([1, 2])  # other rows: fit again
    again, _ = pruner.rows_fit(array, info, 0.5, other)
    assert again.shape[0] == 2 and np.array_equal(pruner._cache[(info.name, 0.5)].sampled[0], other)
    assert pruner._cache[(info.name, 0.5)].plain is None  # with layer statistics: no masked copy kept



def test_a_failed_joint_run_of_the_smallest_weights_leaves_them_to_be_measured_one_by_one():
    from onnxcompress.errors import ModelError
    from onnxcompress.passes import bitpredict
    from onnxcompress.passes.bitsearch import Candidate

    table = [[bitpredict.Entry(Candidate(0.0, 8), 0.01)] for _ in range(3)]

    def fails(changed):
        raise ModelError("onnxruntime failed")

    assert bitpredict.measure_together(table, [0, 1, 2], ["a", "b", "c"], fails, lambda i: [np.zeros(2)]) is None
    assert not any(e.measured for row in table for e in row)
    def code(i):
        if i == 0:  # a's coding failed: its error recorded, as bitwidth._code does
            table[0][0].candidate.error = "failed"
            return None
        return [np.zeros(2)]

    got = bitpredict.measure_together(table, [0, 1, 2], ["a", "b", "c"], lambda changed: {"cost": 2.0, "nsr": 0.1}, code)
    assert got["cost"] == 2.0 and [e.candidate.cost for row in table for e in row] == [0.0, 2.0, 0.0]
    assert [e.measured for row in table for e in row] == [False, True, True]
    assert table[2][0].candidate.group == "b" and table[1][0].candidate.nsr == 0.1 and table[2][0].candidate.nsr == 0
    assert bitpredict.measure_together(table, [0], ["a"], fails, lambda i: [np.zeros(2)]) is None  # one alone: as before


def test_a_wide_layers_cross_fits_hold_a_bounded_number_of_gram_sized_arrays(monkeypatch):
    """The search's fits of a layer whose fold factors overflow the factor cache (the 6912-input conv of madmom's chord
    model: four of 382 MB): what they allocate beyond the layer statistics stays within a few K x K arrays (the
    held-out H of one fold, its factor and the factorization's work), whatever the number of sparsities and folds."""
    import tracemalloc

    import onnxcompress.passes.bitprune as bitprune
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights, get_array
    from test_bitwidth import tiny_data

    k = 384
    model = gemm(k=k, n=8)
    data = load_data(tiny_data(model, n=256))
    info = next(w for w in find_weights(model) if len(w.shape) == 2)
    array = get_array(model, info)
    gram = k * k * 8
    monkeypatch.setattr(bitprune, "FACTOR_CACHE_BYTES", 2 * gram)  # the four fold factors do not fit
    sparsities = (0.5, 0.6, 0.7)
    pruner = bitprune.Pruner(model, data, [info], crossfit=True, sparsities=sparsities)
    pruner.max_flops = 0  # sparsegpt with its factors, as on the wide conv
    pruner.stats[info.name].gram  # the statistics as the search holds them (flushed)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for s in sparsities:
            fits, _ = pruner(array, info, s)
            assert len(fits) == pruner.folds  # cross-fitted
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # main held every fold's held-out H at once, H of all rows, the damping's two fold H and an identity beside each
    # damped copy, with the cached factors: 10.2 K x K at the peak
    assert peak <= 5 * gram, peak / gram  # 3.9 here, main 10.2
