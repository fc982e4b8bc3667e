"""The reference's rows of many layers from one run over the data (runtime.paired.ReferenceRows): the
paired captures that use them are those of a capture that runs the reference itself, with fewer runs."""
from __future__ import annotations

import numpy as np
import pytest


def _shared_input_model():
    """x (4, 6) -> MatMul w1 -> Relu -> r; r -> MatMul w2 -> y; r -> MatMul w3 -> z (w2, w3 read the same rows)."""
    from onnx import helper, numpy_helper, TensorProto
    rng = np.random.default_rng(3)
    init = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("MatMul", ["r", "w3"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [init("w1", (6, 5)), init("w2", (5, 3)), init("w3", (5, 2))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _setup(samples: int = 40):
    import onnx
    from onnx import numpy_helper
    from onnxcompress.graph.data import load_data
    from onnxcompress.graph.weights import find_weights
    from onnxcompress.runtime.capture import linear_layer
    reference = _shared_input_model()
    current = onnx.ModelProto()
    current.CopyFrom(reference)
    w1 = numpy_helper.to_array(current.graph.initializer[0])
    current.graph.initializer[0].CopyFrom(numpy_helper.from_array((w1 + 0.1).astype(np.float32), "w1"))
    layers = [linear_layer(reference, w) for w in sorted(find_weights(reference, min_elements=0), key=lambda w: w.name)]
    data = load_data({"x": np.random.default_rng(5).standard_normal((samples, 4, 6)).astype(np.float32)})
    return reference, current, layers, data


def _same(a, b, rtol):
    assert a.count == b.count
    for x, y in [(a.current, b.current), (a.cross, b.cross), (a.reference, b.reference),
                 (a.current_mean, b.current_mean), (a.reference_mean, b.reference_mean)]:
        for g, h in zip(x, y):
            np.testing.assert_allclose(g, h, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("slow", [False, True])
def test_paired_grams_with_the_held_reference_rows_are_those_of_the_reference_run(monkeypatch, slow):
    """Fast model: every chunk, the reference runs once for three layers (two of them one input) instead of
    once per layer, and the current model once per input. Slow model (CUT_SECONDS): the held rows stop where
    each layer's capture stops."""
    from onnxcompress.runtime import paired
    from onnxcompress.runtime.statistics import Collector, Runner
    reference, current, layers, data = _setup()
    if slow:
        monkeypatch.setattr(paired, "CUT_SECONDS", -1.0)
        monkeypatch.setattr(paired, "MIN_PAIRED_ROWS", 24)
    collector = Collector()
    runs = []
    run = Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))
    alone = [paired.collect_paired_grams(current, reference, data, layer, collector=collector, folds=True)
             for layer in layers]
    runs_alone = len(runs)
    held = paired.ReferenceRows(reference, data, layers, collector=collector)
    assert len(held.layers) == 2 and held.rows(layers[1]) is held.rows(layers[2])
    assert held.rows(layers[0])[0][0].dtype == np.float32  # kept in the input's precision
    both = [paired.collect_paired_grams(current, held, data, layer, collector=collector, folds=True)
            for layer in layers]
    for a, b in zip(alone, both):
        _same(a, b, 1e-6 if slow else 1e-12)
        _same(a.folds[0], b.folds[0], 1e-6 if slow else 1e-12)
    if not slow:
        assert runs_alone == 3 * 2 * 40 and len(runs) - runs_alone == 40 + 2 * 40
    else:
        assert all(a.count == 24 for a in alone)
        # six samples of four rows, the reference once; the current model once for r (its segment), never for
        # x (a graph input: the feed itself)
        assert len(runs) - runs_alone == 6 + 6


def test_rows_past_the_memory_bound_are_dropped_and_captured_alone():
    from onnxcompress.runtime import paired
    from onnxcompress.runtime.statistics import Collector
    reference, current, layers, data = _setup()
    collector = Collector()
    # x's rows: 40 x 4 x 6 float32 = 3840 bytes; r's 40 x 4 x 5 = 3200: room for one of them
    held = paired.ReferenceRows(reference, data, layers, collector=collector, max_bytes=4000)
    assert held.rows(layers[0]) is None and held.rows(layers[1]) is not None
    alone = paired.collect_paired_grams(current, reference, data, layers[0], collector=collector)
    _same(alone, paired.collect_paired_grams(current, held, data, layers[0], collector=collector), 0)


def test_held_rows_of_another_chunking_are_not_used():
    from onnxcompress.runtime import paired
    from onnxcompress.runtime.statistics import Collector
    reference, current, layers, data = _setup()
    held = paired.ReferenceRows(reference, data, layers, collector=Collector())
    alone = paired.collect_paired_grams(current, reference, data, layers[1], max_batch=8)
    _same(alone, paired.collect_paired_grams(current, held, data, layers[1], max_batch=8), 0)
    assert held._rows is None  # never asked: the pass did not run


def _shared_mlp(monkeypatch, held: bool):
    import onnx
    import tiny
    import passes.share as share
    from onnxcompress.graph.data import load_data
    from onnxcompress.pipeline.manager import Context
    model = tiny.mlp()
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, data=load_data(tiny.random_feeds(model, 64, seed=1)), progress=False)
    if not held:
        monkeypatch.setattr(share, "original_rows", lambda *a, **k: None)
    p = share.SharePass(bits_fc=4)
    p.ensures(ctx, p.call(ctx))
    return model, ctx.model


def test_share_with_data_runs_the_original_once_for_its_refinements(monkeypatch):
    """End to end: `share` with data on a sample model takes the original's rows in one run for all its
    refined layers; its output is that of the refinements that run the original per layer (onnxruntime)."""
    import tiny
    from onnxcompress.fitting import layerfit
    from onnxcompress.runtime import paired
    captures, used = [], []
    capture, fit = paired.ReferenceRows._capture, layerfit.layer_fit
    with monkeypatch.context() as m:
        m.setattr(paired.ReferenceRows, "_capture", lambda self: captures.append(1) or capture(self))
        m.setattr(layerfit, "layer_fit", lambda *a, **k: used.append(k.get("reference_rows")) or fit(*a, **k))
        model, held = _shared_mlp(m, True)
    assert len(used) == 3 and all(u is used[0] and u is not None for u in used) and captures == [1]
    _, alone = _shared_mlp(monkeypatch, False)
    feeds = tiny.random_feeds(model, 16, seed=9)
    (want,), (got,), (before,) = tiny.run(model, feeds), tiny.run(held, feeds), tiny.run(alone, feeds)
    np.testing.assert_array_equal(got, before)
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.95


def test_layers_reading_the_same_rows_share_the_current_models_run_until_their_input_changes(monkeypatch):
    """w2 and w3 read the same rows r: w3's paired Grams are w2's (no run of the current model) after w2 is
    rewritten downstream of r; after w1, upstream of r, is rewritten, they are captured again (the new rows)."""
    import onnx
    from onnx import numpy_helper
    from onnxcompress.runtime import paired
    from onnxcompress.runtime.statistics import Collector, Runner
    reference, current, layers, data = _setup()
    collector = Collector()
    held = paired.ReferenceRows(reference, data, layers, collector=collector)
    first = paired.collect_paired_grams(current, held, data, layers[1], collector=collector)
    runs = []
    run = Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))

    def rewritten(model, index, delta):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        tensor = out.graph.initializer[index]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(delta), tensor.name))
        return out

    current = rewritten(current, 1, 0.5)  # w2, downstream of r
    again = paired.collect_paired_grams(current, held, data, layers[2], collector=collector)
    assert runs == [] and again.layer is layers[2]
    _same(again, paired.collect_paired_grams(current, reference, data, layers[2], collector=collector), 1e-12)
    _same(first, again, 0)
    runs.clear()
    current = rewritten(current, 0, 0.25)  # w1, upstream of r: its rows change
    moved = paired.collect_paired_grams(current, held, data, layers[2], collector=collector)
    assert runs and moved.count == first.count
    assert not np.allclose(moved.current[0], first.current[0])
    _same(moved, paired.collect_paired_grams(current, reference, data, layers[2], collector=collector), 1e-12)


def test_held_rows_stop_where_their_row_count_says_and_the_current_models_capture_with_them(monkeypatch):
    """A costly capture stops at MIN_PAIRED_ROWS by default (prune's refits); ReferenceRows given a smaller
    RowCount (share's centroid refits) stops its held rows and the current model's there: the Gram matrices
    of a capture stopping at that count, on fewer rows."""
    from onnxcompress.runtime import paired
    from onnxcompress.runtime.statistics import Collector
    reference, current, layers, data = _setup()
    monkeypatch.setattr(paired, "CUT_SECONDS", -1.0)
    monkeypatch.setattr(paired, "MIN_PAIRED_ROWS", 48)
    collector = Collector()
    default = paired.collect_paired_grams(current, reference, data, layers[1], collector=collector)
    held = paired.ReferenceRows(reference, data, layers, collector=collector,
                                enough=paired.RowCount(minimum=12, per_input=1))
    fewer = paired.collect_paired_grams(current, held, data, layers[1], collector=collector)
    assert default.count == 48 and fewer.count == 12  # a sample of four rows a chunk
    assert sum(r[0].shape[0] for r in held.rows(layers[1])) == 12
    monkeypatch.setattr(paired, "MIN_PAIRED_ROWS", 12)
    _same(fewer, paired.collect_paired_grams(current, reference, data, layers[1], collector=collector), 1e-6)
    assert paired.RowCount(minimum=8, per_input=10).stops(layers[1], True, 49, 2) is False  # K = 5: 50 rows


def test_share_on_a_costly_model_refits_its_centroids_on_the_centroid_row_count(monkeypatch):
    """End to end (onnxruntime): a model taken as costly captures each refined layer's rows until
    layerfit.CENTROID_ROWS has enough, not until the paired captures' default does, and its output still
    follows the original's."""
    import onnx
    import tiny
    import passes.share as share
    from onnxcompress.fitting import layerfit
    from onnxcompress.graph.data import load_data
    from onnxcompress.pipeline.manager import Context
    from onnxcompress.runtime import paired
    monkeypatch.setattr(paired, "CUT_SECONDS", -1.0)
    monkeypatch.setattr(layerfit, "CENTROID_ROWS", paired.RowCount(minimum=32, per_input=0))
    model = tiny.mlp()
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ctx = Context(original=model, model=working, data=load_data(tiny.random_feeds(model, 64, seed=1)), progress=False)
    p = share.SharePass(bits_fc=4)
    p.ensures(ctx, p.call(ctx))
    rows = [r.details["refine_rows"] for r in ctx.records if "refine_rows" in r.details]
    assert len(rows) == 3 and set(rows) == {32}  # of 64 rows (the default would take them all)
    feeds = tiny.random_feeds(model, 16, seed=9)
    (want,), (got,) = tiny.run(model, feeds), tiny.run(ctx.model, feeds)
    onnx.checker.check_model(ctx.model, full_check=True)
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.95
