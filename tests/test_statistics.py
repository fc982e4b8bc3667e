"""The statistics collector: reducers, packing into one run, the memory bound, sessions per graph."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import tiny
from onnxcompress.graph.data import Dataset, model_inputs
from onnxcompress.graph.weights import find_weights
from onnxcompress.numerics.quantmath import StreamingHistogram
from onnxcompress.runtime import sessions as runtime
from onnxcompress.runtime.capture import LayerInputs, linear_layer
from onnxcompress.runtime.statistics import ChannelMeans, Collector, Extremes, Histogram, pack_runs, weights_as_inputs


def _reference_values(model, feeds, names):
    """The tensors `names` of `model` on the whole stacked `feeds`, from a plain session."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = runtime.make_session(exposed)
    return dict(zip(names, session.run(names, feeds)))


def test_extremes_histogram_and_means_match_numpy_over_all_chunks():
    model = tiny.conv_gemm()
    feeds = tiny.random_feeds(model, n=40, seed=3)
    data = Dataset(stacked=feeds)
    ref = _reference_values(model, feeds, ["c", "r", "f"])
    lo, hist, means = Extremes("c"), Histogram("r", bins=64), ChannelMeans("c", axis=1)
    collector = Collector()
    collector.gather(model, data, [lo, hist, means], max_batch=16)
    np.testing.assert_allclose([lo.low, lo.high], [ref["c"].min(), ref["c"].max()], rtol=1e-5)
    expected = StreamingHistogram(64)
    for start in range(0, 40, 16):  # the same chunks, updated in the same order
        part = ref["r"][start:start + 16]
        expected.update(part, minmax=(float(part.min()), float(part.max())))
    assert hist.histogram.count == ref["r"].size
    np.testing.assert_allclose(hist.histogram.half_range, expected.half_range, rtol=1e-6)
    assert abs(int(hist.histogram.counts.sum()) - int(expected.counts.sum())) == 0
    np.testing.assert_allclose(means.mean, ref["c"].mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert collector.runs == 1 and collector.built == 1  # three requests, one run, one session


def test_layer_inputs_gram_and_mean_are_those_of_the_input_rows():
    model = tiny.gemm(k=24, n=8)
    feeds = tiny.random_feeds(model, n=50, seed=1)
    info = next(w for w in find_weights(model, min_elements=0) if w.name == "W")
    stats = LayerInputs(linear_layer(model, info))
    Collector().gather(model, Dataset(stacked=feeds), [stats], max_batch=16)
    x = feeds["x"].astype(np.float64)
    np.testing.assert_allclose(stats.hessian(0), x.T @ x / len(x), rtol=1e-6)
    np.testing.assert_allclose(stats.means()[0], x.mean(axis=0), rtol=1e-6, atol=1e-12)
    assert stats.count == 50


def test_two_requests_on_different_tensors_take_one_run_and_one_session():
    model = tiny.mlp(layers=3, width=16)
    data = Dataset(stacked=tiny.random_feeds(model, n=20))
    collector = Collector()
    a, b = ChannelMeans("h0", axis=-1), Extremes("r1")
    collector.gather(model, data, [a, b], max_batch=8)
    assert collector.runs == 1 and collector.built == 1
    assert a.count == 20 and np.isfinite(b.low) and b.low >= 0  # r1 is a Relu output


def test_a_tiny_memory_bound_takes_more_runs_and_gives_the_same_statistics():
    model = tiny.mlp(layers=3, width=16)
    data = Dataset(stacked=tiny.random_feeds(model, n=24, seed=2))
    layers = [linear_layer(model, w) for w in find_weights(model, min_elements=0)]

    def gather(collector):
        stats = [LayerInputs(layer, folds=2) for layer in layers]
        collector.gather(model, data, stats, max_batch=8)
        return stats

    loose, tight = Collector(), Collector(max_bytes=1)
    one, several = gather(loose), gather(tight)
    assert loose.runs == 1 and tight.runs == len(layers) == 3
    for a, b in zip(one, several):
        assert a.count == b.count == 24 * 1  # rows of a MatMul input: one per sample
        np.testing.assert_array_equal(a.gram[0], b.gram[0])
        np.testing.assert_array_equal(a.rows[0], b.rows[0])
        np.testing.assert_array_equal(a.fold_hessians()[0], b.fold_hessians()[0])


def test_pack_runs_keeps_order_and_lets_an_oversized_item_run_alone():
    assert pack_runs([3, 3, 5, 1, 1], lambda x: x, 6) == [[3, 3], [5, 1], [1]]
    assert pack_runs([10, 1], lambda x: x, 6) == [[10], [1]]
    assert pack_runs([], lambda x: x, 6) == []


def test_models_differing_only_in_weights_share_one_session_and_keep_their_own_values():
    model = tiny.mlp(layers=2, width=16)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    w = numpy_helper.to_array(pruned.graph.initializer[0]).copy()
    w[np.abs(w) < np.median(np.abs(w))] = 0
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, pruned.graph.initializer[0].name))
    feeds = tiny.random_feeds(model, n=12)
    data = Dataset(stacked=feeds)
    collector = Collector()
    got = [np.concatenate([v["y"] for v in collector.stream(m, data, ["y"], max_batch=4)]) for m in (model, pruned)]
    assert collector.built == 1
    np.testing.assert_allclose(got[0], tiny.run(model, feeds)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], tiny.run(pruned, feeds)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1])


def test_a_swapped_weight_runs_as_the_model_with_that_weight_and_no_new_session():
    model = tiny.conv_gemm()
    feeds = tiny.random_feeds(model, n=8)
    collector = Collector()
    runner = collector.runner(model, ["y"], also=["fc.W"])
    other = (np.random.default_rng(5).standard_normal((10, 512)) * 0.1).astype(np.float32)
    swapped = runner.run(feeds, {"fc.W": other}).values["y"]
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    next(t for t in changed.graph.initializer if t.name == "fc.W").CopyFrom(numpy_helper.from_array(other, "fc.W"))
    np.testing.assert_allclose(swapped, tiny.run(changed, feeds)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.run(feeds).values["y"], tiny.run(model, feeds)[0], rtol=1e-5, atol=1e-6)
    collector.runner(model, ["f"])  # a layer input of the same graph: the cached session has it
    assert collector.built == 1


def test_weights_as_inputs_keeps_small_constants_in_the_graph():
    model = tiny.conv_gemm()
    extra = numpy_helper.from_array(np.array([2.0], np.float32), "two")
    model.graph.initializer.append(extra)
    light, arrays = weights_as_inputs(model)
    assert set(arrays) == {"conv.W", "fc.W"}  # biases of 8 and 10 entries, and the scalar, stay
    assert {i.name for i in light.graph.input} == {"x", "conv.W", "fc.W"}
    assert {t.name for t in light.graph.initializer} == {"conv.b", "fc.b", "two"}
    assert not any(t.raw_data and len(t.raw_data) > 64 for t in light.graph.initializer)


def test_fixed_weight_sessions_are_keyed_by_the_weights_bytes():
    model = tiny.gemm(k=32, n=8)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = numpy_helper.to_array(other.graph.initializer[0]) * 2
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    feeds = tiny.random_feeds(model, n=4)
    data = Dataset(stacked=feeds)
    collector = Collector()
    a = [Extremes("y")]
    b = [Extremes("y")]
    collector.gather(model, data, a, fixed_weights=True)
    collector.gather(other, data, b, fixed_weights=True)
    assert collector.built == 2
    np.testing.assert_allclose(a[0].high, tiny.run(model, feeds)[0].max(), rtol=1e-6)
    np.testing.assert_allclose(b[0].high, tiny.run(other, feeds)[0].max(), rtol=1e-6)


def test_a_model_that_fails_on_the_data_is_one_model_error():
    from onnxcompress.errors import ModelError
    model = tiny.gemm(k=8, n=4)
    data = Dataset([{"x": np.zeros((2, 5), np.float32)}])  # 5 features where the layer takes 8
    with pytest.raises(ModelError, match="onnxruntime failed on"):
        Collector().gather(model, data, [Extremes("y")])


def _count_sessions(monkeypatch) -> list:
    """Every runtime.make_session call, wherever the module that calls it imported it."""
    built = []
    real = runtime.make_session

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if (name.startswith("onnxcompress") or name.startswith("passes")) and getattr(module, "make_session", None) is real:
            monkeypatch.setattr(module, "make_session", counting)
    return built


def test_share_with_data_builds_few_sessions(monkeypatch):
    """Regression guard for the session count: share-4bit with data on a three-layer model (gains probed
    per layer, layers refit in order). Before the collector: 16 sessions (one per capture, one per gain
    probe); with it 5: one for the original's graph, one per refit layer's changed graph, two to validate.
    The refits' captures cut the models after the layer's input only where a pass over the data through the
    whole model was slow (capture.CUT_SECONDS), which it is not here."""
    from onnxcompress import api
    import onnxcompress.passes  # noqa: F401  (imported before counting: every module that builds sessions)
    import onnxcompress.runtime.metrics  # noqa: F401

    model = tiny.mlp(layers=3, width=32)
    data = Dataset(stacked=tiny.random_feeds(model, n=64, seed=4))
    built = _count_sessions(monkeypatch)
    api.compress(model, "share-4bit", data, progress=False)
    assert 0 < len(built) <= 6, len(built)


def _old_way_gram(model, data, layer, session, weights):
    """The Gram matrix and row sum of `layer`'s input as c7d67f3's capture computed them: one session, the
    data's chunks of 64 in order, float64 rows, sum of rows.T @ rows from zeros."""
    gram = total = None
    for feed, _ in data.chunks(model_inputs(model), max_batch=64):
        x = session.run([layer.input_name], {**feed, **weights})[0]
        rows = layer.input_rows(np.asarray(x, dtype=np.float64), 2048, None)[0]
        gram = np.zeros((rows.shape[1],) * 2) if gram is None else gram
        total = np.zeros(rows.shape[1]) if total is None else total
        gram += rows.T @ rows
        total += rows.sum(axis=0)
    return gram, total


def _two_convs(c: int = 8, m: int = 16, size: int = 5) -> onnx.ModelProto:
    """Conv -> Relu -> Conv: the second layer's input comes out of a Conv kernel."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(tiny.weights(rng, m, c, 3, 3), "W1"),
             numpy_helper.from_array(tiny.weights(rng, m, m, 3, 3), "W2")]
    nodes = [onnx.helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             onnx.helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             onnx.helper.make_node("Conv", ["r1", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    return tiny.make_model(nodes, [tiny.value("x", ["N", c, size, size])], [tiny.value("y", ["N", m, size, size])],
                           inits)


def test_the_collectors_gram_is_the_old_captures_bit_for_bit_for_the_same_kind_of_session():
    """Summation order, dtype and batching are c7d67f3's exactly; what differs from it is only the session.
    Weights fed as inputs (one session for a graph whatever its weights) take other onnxruntime kernels
    than constant ones (at ORT_ENABLE_ALL a constant-weight Conv runs in the NCHWc layout, a constant GEMM
    operand is prepacked), so a layer after them sees inputs that differ by rounding (here about 2e-8 of
    the Gram matrix, on LeNet-5's fc1 1.2e-7); fixed_weights=True gives c7d67f3's numbers exactly."""
    model = _two_convs()
    data = Dataset(stacked=tiny.random_feeds(model, n=150, seed=5))
    layer = linear_layer(model, next(w for w in find_weights(model, min_elements=0) if w.name == "W2"))
    for fixed in (True, False):
        stats = LayerInputs(layer)
        Collector().gather(model, data, [stats], fixed_weights=fixed)
        if fixed:
            light, arrays = runtime.detached(model, also={"W1", "W2"})
            weights = {}
        else:
            light, weights = weights_as_inputs(model)
            arrays = None
        light.graph.output.extend([onnx.ValueInfoProto(name=layer.input_name)])
        gram, total = _old_way_gram(model, data, layer, runtime.make_session(light, arrays=arrays), weights)
        assert stats.count == 150 * 5 * 5  # 64 samples x 25 positions a chunk: no row is subsampled
        assert np.array_equal(stats.gram[0], gram) and np.array_equal(stats.sums[0], total), fixed


def test_row_blocks_stack_small_blocks_and_pass_large_ones_as_they_come():
    """Small blocks reach the sink stacked (one product for many), large ones alone and in order: the sums
    are those of block by block, exactly when every block is large."""
    from onnxcompress.numerics import row_blocks
    rng = np.random.default_rng(0)
    cases = {(30,) * 100: [69 * 30, 31 * 30], (300, 5, 7, 400, 3): [300, 12, 400, 3], (2049, 2049): [2049, 2049]}
    for sizes, stacked in cases.items():
        blocks = [rng.standard_normal((n, 6)) for n in sizes]
        calls, total = [], np.zeros((6, 6))

        def sink(x, y):
            nonlocal total
            calls.append(x.shape[0])
            total = total + x.T @ y

        stack = row_blocks.RowBlocks(sink)
        for b in blocks:
            stack.add(b, 2 * b)
        stack.flush()
        want = sum(2 * b.T @ b for b in blocks)
        assert calls == stacked
        np.testing.assert_allclose(total, want, rtol=1e-12)
    assert np.array_equal(total, want)  # large blocks only: block by block, bit for bit
