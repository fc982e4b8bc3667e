"""A changing model's layer inputs run segment by segment from held values (runtime.segments.SegmentValues):
the same values as running the model up to them, with each node run about once over a refinement."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto


def _chain():
    """x (2, 6) -> MatMul w1 -> Relu -> r1 -> MatMul w2 -> Relu -> r2 -> MatMul w3 -> y; r1 also -> Add -> y2."""
    rng = np.random.default_rng(7)
    init = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"]), helper.make_node("Add", ["r1", "r1"], ["y2"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
                              [init("w1", (6, 5)), init("w2", (5, 5)), init("w3", (5, 3))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _set(model, name, array):
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _whole(model, data, name):
    """What the model cut at `name` gives, chunk by chunk (the path the segments replace)."""
    from onnxcompress.graph.edit import upstream_model
    from onnxcompress.runtime.statistics import Collector
    return [v[name] for v in Collector().stream(upstream_model(model, [name]), data, [name], max_batch=4)]


def _data(samples=12):
    from onnxcompress.graph.data import load_data
    return load_data({"x": np.random.default_rng(1).standard_normal((samples, 2, 6)).astype(np.float32)})


def test_layer_inputs_in_order_run_each_node_once_per_chunk_and_equal_the_cut_models():
    """Fit w1 then w2 then w3 (each rewritten after its input is read): r1 runs MatMul+Relu, r2 only the next
    MatMul+Relu from the held r1, and every value is the cut model's."""
    from onnxcompress.runtime.segments import SegmentValues
    model, data = _chain(), _data()
    parts = [data.subset(slice(p, None, 2)) for p in range(2)]  # two interleaved parts, as a costly capture reads
    values = SegmentValues(parts, max_batch=4)
    rng = np.random.default_rng(2)
    chunks = 0
    for layer, (name, weight, shape) in enumerate([("x", "w1", (6, 5)), ("r1", "w2", (5, 5)), ("r2", "w3", (5, 3))]):
        got = [v[name] for v in values.stream(model, name)]
        expected = [np.asarray(v) for part in parts for v in _whole(model, part, name)]
        chunks = len(got)
        assert len(got) == len(expected) == 12  # one sample a chunk (a fixed batch axis)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        _set(model, weight, rng.standard_normal(shape))  # the layer is "coded": what is downstream changes
    assert values.nodes_run == 2 * chunks + 2 * chunks  # x: the feed; r1: MatMul, Relu; r2: MatMul, Relu


def test_a_held_value_is_dropped_when_what_computes_it_changes():
    """r1 held, then w1 changes: r1 runs again from x, with the new w1."""
    from onnxcompress.runtime.segments import SegmentValues
    model, data = _chain(), _data()
    values = SegmentValues([data], max_batch=4)
    first = [v["r2"] for v in values.stream(model, "r2")]
    assert len(first) == 12 and values.nodes_run == 4 * 12
    again = [v["r1"] for v in values.stream(model, "r1")]  # held: r1 is read by Add and MatMul outside r2's cut
    assert values.nodes_run == 4 * 12
    _set(model, "w1", np.ones((6, 5)))
    changed = [v["r2"] for v in values.stream(model, "r2")]
    assert values.nodes_run == 2 * 4 * 12
    for a, b in zip(again, _whole(model, data, "r1")):
        assert not np.allclose(a, b)
    for a, b in zip(changed, _whole(model, data, "r2")):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_past_the_memory_bound_nothing_is_held_and_each_request_runs_from_the_inputs():
    from onnxcompress.runtime.segments import SegmentValues
    model, data = _chain(), _data()
    values = SegmentValues([data], max_batch=4, max_bytes=0)
    for name in ("r1", "r2"):
        for a, b in zip([v[name] for v in values.stream(model, name)], _whole(model, data, name)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    assert values.nodes_run == 12 * 2 + 12 * 4


def test_value_digests_change_downstream_of_a_changed_weight_only():
    from onnxcompress.graph.edit import value_digests
    model = _chain()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    before = value_digests(model)
    assert before == value_digests(copy)
    _set(copy, "w2", np.zeros((5, 5)))
    after = value_digests(copy)
    assert [n for n in before if before[n] != after[n]] == ["w2", "h2", "r2", "y"]
    from onnxcompress.runtime.segments import SegmentValues
    assert SegmentValues.usable(copy, _data())
    copy.graph.initializer[0].data_location = TensorProto.EXTERNAL
    assert value_digests(copy) is None and not SegmentValues.usable(copy, _data())


def test_upstream_nodes_stop_at_values_at_hand():
    from onnxcompress.graph.edit import upstream_nodes

    graph = _chain().graph
    ops = lambda nodes: [n.output[0] for n in nodes]  # noqa: E731
    assert ops(upstream_nodes(graph, ["y"])) == ["h1", "r1", "h2", "r2", "y"]
    assert ops(upstream_nodes(graph, ["y"], stop={"r1"})) == ["h2", "r2", "y"]
    assert ops(upstream_nodes(graph, ["y2", "r2"], stop={"h1"})) == ["r1", "h2", "r2", "y2"]


def test_streams_give_several_values_a_chunk_and_release_keeps_only_the_named_ones():
    """streams(model, [r1, r2]) is stream's values side by side (each node once a chunk); after release(model, [r2])
    a request for r1 runs again from the feeds, one for y only the last MatMul from the held r2."""
    from onnxcompress.runtime.segments import SegmentValues
    model, data = _chain(), _data()
    values = SegmentValues([data], max_batch=4)
    both = list(values.streams(model, ["r1", "r2"]))
    chunks = len(both)
    assert values.nodes_run == 4 * chunks  # MatMul, Relu, MatMul, Relu
    for got, r1, r2 in zip(both, _whole(model, data, "r1"), _whole(model, data, "r2")):
        np.testing.assert_allclose(got["r1"], r1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["r2"], r2, rtol=1e-6, atol=1e-6)
    values.release(model, ["r2"])
    list(values.stream(model, "y"))
    assert values.nodes_run == 5 * chunks  # only the last MatMul: r2 held
    list(values.stream(model, "r1"))
    assert values.nodes_run == 7 * chunks  # r1 was let go: MatMul and Relu again
