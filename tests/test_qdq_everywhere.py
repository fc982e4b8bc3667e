"""The QDQ passes see every weight: Constant nodes, If branches, LSTM, weights shared by several nodes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import tiny
from onnxcompress.graph.data import Dataset
from onnxcompress.passes.calibrate import CalibratePass
from onnxcompress.passes.qdq import QdqPass
from onnxcompress.pipeline.manager import PassManager
from onnxcompress.numerics.measures import sqnr_db_of


def int8(model, data, **qdq):
    qdq.setdefault("agreement", None)  # the fidelity guard has its own tests
    return PassManager([CalibratePass(), QdqPass(**qdq)], validate="none").run(model, data)


def dq_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """DQ output name -> dtype of its quantized input, over every graph."""
    from onnxcompress.graph.edit import iter_graphs
    out = {}
    for graph, _ in iter_graphs(model.graph):
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        out.update({n.output[0]: inits[n.input[0]].dtype.name for n in graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in inits})
    return out


def constant_and_if_model(seed: int = 0) -> onnx.ModelProto:
    """Conv whose weight is a Constant node -> Relu -> Flatten -> If(mean(x) > 0) choosing one of
    two MatMul heads whose weights are Constant nodes inside the branches."""
    rng = np.random.default_rng(seed)
    w = tiny.weights(rng, 8, 4, 3, 3, scale=0.3)

    def head(name: str) -> onnx.GraphProto:
        wt = numpy_helper.from_array(tiny.weights(rng, 8 * 6 * 6, 10, scale=0.1), f"{name}_W")
        return helper.make_graph([helper.make_node("Constant", [], [f"{name}_W"], value=wt, name=f"{name}_const"),
                                  helper.make_node("MatMul", ["f", f"{name}_W"], [f"{name}_y"], name=f"{name}_mm")],
                                 name, [], [tiny.value(f"{name}_y", ["N", 10])])
    nodes = [helper.make_node("Constant", [], ["convW"], value=numpy_helper.from_array(w, "convW"), name="cw"),
             helper.make_node("Conv", ["x", "convW"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
             helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0, name="mean"),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32)),
                              name="zero_const"),
             helper.make_node("Greater", ["mean", "zero"], ["flag"], name="flag"),
             helper.make_node("If", ["flag"], ["y"], then_branch=head("then"), else_branch=head("else"), name="if")]
    return tiny.make_model(nodes, [tiny.value("x", ["N", 4, 8, 8])], [tiny.value("y", ["N", 10])])


def test_int8_quantizes_weights_in_constant_nodes_and_if_branches():
    model = constant_and_if_model()
    x = np.random.default_rng(0).standard_normal((32, 4, 8, 8)).astype(np.float32)
    data = Dataset(stacked={"x": x})
    quantized, report = int8(model, data)
    onnx.checker.check_model(quantized, full_check=True)
    made = dq_outputs(quantized)
    assert made["convW"] == "int8" and made["then_W"] == "int8" and made["else_W"] == "int8"
    assert quantized.ByteSize() < model.ByteSize() / 3
    for sign in (1, -1):  # both branches
        feeds = {"x": sign * np.abs(x[:8])}
        assert sqnr_db_of(tiny.run(model, feeds)[0], tiny.run(quantized, feeds)[0]) > 25


def unrolled_cells(steps: int = 3, hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """h_{t+1} = Tanh(Gemm(h_t, W, b)) for `steps` steps, every Gemm reading the same W and b
    (an exporter's unrolled recurrent cell)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(tiny.weights(rng, hidden, hidden, scale=0.4), "cell.W"),
             numpy_helper.from_array(tiny.weights(rng, hidden, scale=0.4), "cell.bias_ih")]
    nodes, h = [], "x"
    for t in range(steps):
        nodes += [helper.make_node("Gemm", [h, "cell.W", "cell.bias_ih"], [f"g{t}"], transB=1, name=f"gemm{t}"),
                  helper.make_node("Tanh", [f"g{t}"], [f"h{t}"], name=f"tanh{t}")]
        h = f"h{t}"
    return tiny.make_model(nodes, [tiny.value("x", ["N", hidden])], [tiny.value(h, ["N", hidden])], inits)


def test_weight_and_bias_shared_by_unrolled_cells_get_one_dequantize_each():
    model = unrolled_cells()
    data = Dataset(stacked=tiny.random_feeds(model, n=64))
    quantized, report = int8(model, data)  # was: Duplicate definition of name (cell.bias_ih)
    onnx.checker.check_model(quantized, full_check=True)
    dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert sum(n.output[0] == "cell.W" for n in dq) == 1
    assert sum(n.output[0] == "cell.bias_ih" for n in dq) <= 1
    readers = [n for n in quantized.graph.node if n.op_type == "Gemm"]
    assert len(readers) == 3 and all(n.input[1] == "cell.W" and n.input[2] == "cell.bias_ih" for n in readers)
    bias = [r for r in report.weights if r.name == "cell.bias_ih"]
    assert len(bias) == 1 and (bias[0].action.startswith("int32") or "input scales differ" in bias[0].action)
    feeds = {"x": data.stacked["x"][:16]}
    assert sqnr_db_of(tiny.run(model, feeds)[0], tiny.run(quantized, feeds)[0]) > 25


def lstm_model(hidden: int = 16, inputs: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(tiny.weights(rng, 1, 4 * hidden, inputs, scale=0.3), "lstm.W"),
             numpy_helper.from_array(tiny.weights(rng, 1, 4 * hidden, hidden, scale=0.3), "lstm.R"),
             numpy_helper.from_array(tiny.weights(rng, 1, 8 * hidden, scale=0.1), "lstm.B")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"),
             helper.make_node("LSTM", ["xt", "lstm.W", "lstm.R", "lstm.B"], ["yt"], hidden_size=hidden, name="lstm"),
             helper.make_node("Transpose", ["yt"], ["y"], perm=[2, 0, 1, 3], name="to_batch_major")]
    return tiny.make_model(nodes, [tiny.value("x", ["N", 5, inputs])], [tiny.value("y", ["N", 5, 1, hidden])], inits)


def test_lstm_weights_go_through_a_weight_only_dequantize_that_onnxruntime_runs():
    model = lstm_model()
    x = np.random.default_rng(1).standard_normal((32, 5, 8)).astype(np.float32)
    data = Dataset(stacked={"x": x})
    quantized, report = int8(model, data)
    onnx.checker.check_model(quantized, full_check=True)
    made = dq_outputs(quantized)
    assert made["lstm.W"] == "int8" and made["lstm.R"] == "int8"
    lstm = next(n for n in quantized.graph.node if n.op_type == "LSTM")
    assert list(lstm.input[1:3]) == ["lstm.W", "lstm.R"]
    feeds = {"x": x[:8]}
    assert sqnr_db_of(tiny.run(model, feeds)[0], tiny.run(quantized, feeds)[0]) > 25
    assert quantized.ByteSize() < model.ByteSize()


def test_a_weight_also_listed_as_a_graph_input_is_treated_as_a_constant():
    """An initializer also listed as a graph input (IR < 4 exports) is a default a caller could
    override; the manager drops it from the inputs, with a note, so it is quantized like any other."""
    model = unrolled_cells(hidden=16)
    model.graph.input.append(tiny.value("cell.W", [16, 16]))
    data = Dataset(stacked={"x": tiny.random_feeds(model, n=16)["x"]})
    quantized, report = int8(model, data)
    onnx.checker.check_model(quantized, full_check=True)
    assert "cell.W" in dq_outputs(quantized)
    assert "cell.W" not in [i.name for i in quantized.graph.input]
    assert any("also listed as graph inputs (cell.W)" in note for note in report.notes)
    feeds = {"x": tiny.random_feeds(model, n=8)["x"]}
    assert sqnr_db_of(tiny.run(model, feeds)[0], tiny.run(quantized, feeds)[0]) > 25


def test_weights_left_float_each_get_a_reason_in_the_report():
    """Without the manager's clean-up, a weight that is also a graph input stays float, said so."""
    from onnxcompress.pipeline.manager import Context

    model = unrolled_cells(hidden=16)
    model.graph.input.append(tiny.value("cell.W", [16, 16]))
    info = next(w for w in Context(original=model, model=model).weights(0) if w.name == "cell.W")
    assert info.skip == "also a graph input, so it may be overridden at run time"


def test_a_result_that_did_not_shrink_says_so(tmp_path):
    from onnxcompress.api import compress_file

    model = unrolled_cells(hidden=8)  # 64-element weights: int8-weights leaves them all float (tiny)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = compress_file(src, tmp_path / "out.onnx", "int8-weights")
    assert report.output_bytes >= report.input_bytes
    assert any("is not smaller than the input" in n for n in report.notes)
    big = tmp_path / "big.onnx"
    onnx.save(unrolled_cells(hidden=32), big)
    assert not any("not smaller" in n for n in compress_file(big, tmp_path / "o2.onnx", "int8-weights").notes)


def _embedding_model(rows: int = 3000, dim: int = 16, seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(w): an embedding table read by rows, then a projection."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, dim)) * rng.uniform(0.1, 3.0, (rows, 1))).astype(np.float32)
    w = (rng.standard_normal((dim, 8)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")]
    return tiny.make_model(nodes, [tiny.value("ids", ["N", 5], onnx.TensorProto.INT64)],
                           [tiny.value("y", ["N", 5, 8])],
                           [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])


def test_an_embedding_table_is_dequantized_by_the_rows_gathered_not_whole(monkeypatch):
    """onnxruntime does not fold DequantizeLinear of a constant: DQ(table) -> Gather dequantized the
    whole table at every call. The rewrite gathers int8 rows and dequantizes only them, same values."""
    from onnxcompress.passes import qdq
    from onnxcompress.formats.qdq_weights import gather_before_dequantize

    model = _embedding_model()
    ids = np.random.default_rng(1).integers(0, 3000, (64, 5)).astype(np.int64)
    data = Dataset(stacked={"ids": ids})
    for mode in ("weights", "static"):
        out, _ = int8(model, data, mode=mode)
        inits = {t.name: t for t in out.graph.initializer}
        gathers = [n for n in out.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and list(inits[n.input[0]].dims) == [3000, 16]]
        assert gathers and all(inits[g.input[0]].data_type == onnx.TensorProto.INT8 for g in gathers), mode
        assert not any(n.op_type == "DequantizeLinear" and n.input[0] == gathers[0].input[0] for n in out.graph.node)
        onnx.checker.check_model(out, full_check=True)
        assert sqnr_db_of(tiny.run(model, {"ids": ids})[0], tiny.run(out, {"ids": ids})[0]) > 30, mode
    # bit for bit what dequantizing the whole table first gives
    monkeypatch.setattr(qdq, "gather_before_dequantize", lambda model, name: 0)
    for per_channel in (True, False):
        whole, _ = int8(model, data, mode="weights", per_channel=per_channel)
        rows = onnx.ModelProto()
        rows.CopyFrom(whole)
        assert gather_before_dequantize(rows, "qdq") == 1
        assert not any(n.op_type == "DequantizeLinear" and n.output[0] == "table" for n in rows.graph.node)
        np.testing.assert_array_equal(tiny.run(whole, {"ids": ids})[0], tiny.run(rows, {"ids": ids})[0])


def test_a_table_an_if_branch_also_reads_keeps_its_dequantize_linear():
    """A subgraph reading the dequantized table from the outer scope is a reader too: the table is
    then left dequantized whole (gathering it first would leave the branch without its input)."""
    from onnxcompress.formats.qdq_weights import gather_before_dequantize

    q = numpy_helper.from_array(np.arange(-32, 32, dtype=np.int8).reshape(16, 4), "q")
    s = numpy_helper.from_array(np.full(16, 0.5, np.float32), "s")
    branch = helper.make_graph([helper.make_node("ReduceSum", ["table"], ["t"], keepdims=0)], "then", [],
                               [tiny.value("t", [])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value_float=0.0)], "else", [],
                              [tiny.value("e", [])])
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["table"], axis=0),
             helper.make_node("Gather", ["table", "ids"], ["y"]),
             helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=other)]
    model = tiny.make_model(nodes, [tiny.value("ids", [3], onnx.TensorProto.INT64), tiny.value("c", [], onnx.TensorProto.BOOL)],
                            [tiny.value("y", [3, 4]), tiny.value("z", [])], [q, s])
    assert gather_before_dequantize(model, "qdq") == 0
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Gather", "If"]


def test_two_embedding_tables_are_both_gathered_before_dequantizing():
    """Token and position tables (every BERT): the first rewrite rebuilt the node list, so the second table's
    DQ and its Gather were stale objects, never replaced, and its per-row scales stayed as unread initializers
    (12 KB of a 3000-row table's scales in a dynamo-exported BERT's int8 output)."""
    rng = np.random.default_rng(0)
    tables = {name: (rng.standard_normal((rows, 16)) * rng.uniform(0.1, 3.0, (rows, 1))).astype(np.float32)
              for name, rows in (("tok", 3000), ("pos", 512))}
    nodes = [helper.make_node("Gather", ["tok", "ids"], ["a"], name="tok_embed"),
             helper.make_node("Gather", ["pos", "ids"], ["b"], name="pos_embed"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = tiny.make_model(nodes, [tiny.value("ids", ["N", 5], onnx.TensorProto.INT64)],
                            [tiny.value("y", ["N", 5, 16])],
                            [numpy_helper.from_array(t, name) for name, t in tables.items()])
    ids = np.random.default_rng(1).integers(0, 512, (64, 5)).astype(np.int64)
    out, _ = int8(model, Dataset(stacked={"ids": ids}), mode="weights")
    read = {x for n in out.graph.node for x in n.input}
    assert [t.name for t in out.graph.initializer if t.name not in read] == []
    assert not any(n.op_type == "DequantizeLinear" for n in out.graph.node)  # both tables gathered as int8 rows
    onnx.checker.check_model(out, full_check=True)
    assert sqnr_db_of(tiny.run(model, {"ids": ids})[0], tiny.run(out, {"ids": ids})[0]) > 30
