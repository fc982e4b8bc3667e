"""Task kinds: what agreement means per output (detected or chosen), and the budget honouring it."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import api
from onnxcompress.errors import RecipeError
from onnxcompress.runtime.metrics import compare_models, compare_outputs
from onnxcompress.recipes import Recipe
from onnxcompress.runtime.tasks import (TaskMetric, ctc_greedy, detect_kind, neighbour_agreement, output_producers,
                                parse_metric, resolve_kinds)
from tiny import make_model, value, weights


def _head(op: str, n: int = 1, k: int = 16, seed: int = 0, steps: int | None = None):
    """x [batch(, steps), k] -> MatMul W [k, n] -> op (None: no op after the MatMul)."""
    rng = np.random.default_rng(seed)
    shape = ["N", k] if steps is None else ["N", steps, k]
    out = ["N", n] if steps is None else ["N", steps, n]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h" if op else "y"])]
    inits = [numpy_helper.from_array(weights(rng, k, n, scale=0.5), "W")]
    if op == "LayerNormalization":
        inits += [numpy_helper.from_array(np.ones(n, np.float32), "g"), numpy_helper.from_array(np.zeros(n, np.float32), "b")]
        nodes.append(helper.make_node(op, ["h", "g", "b"], ["y"], axis=-1))
    elif op:
        nodes.append(helper.make_node(op, ["h"], ["y"], **({"axis": -1} if op == "Softmax" else {})))
    return make_model(nodes, [value("x", shape)], [value("y", out)], inits)


def _feeds(model, n=64, seed=1):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def test_metric_specs_parse_and_bad_ones_say_why():
    assert parse_metric("probability:0.3") == TaskMetric("probability", threshold=0.3)
    assert parse_metric("ctc:-1@logits").blank == -1 and parse_metric("ctc:-1@logits").outputs == ("logits",)
    assert parse_metric("regression").tolerance == 0.05
    assert parse_metric("embedding@a+b").outputs == ("a", "b")
    for bad, why in (("probability:1.5", "between 0 and 1"), ("colour", "unknown metric kind"),
                     ("top1:3", "takes no parameter"), ("regression:-1", "positive")):
        with pytest.raises(RecipeError, match=why):
            parse_metric(bad)


def test_kinds_are_detected_from_values_and_the_producing_op():
    from tiny import run

    for op, n, steps, want in (("Sigmoid", 1, None, "probability"), ("Softmax", 5, None, "top1"),
                               ("Softmax", 4, 7, "sequence"), ("LayerNormalization", 32, None, "embedding"),
                               (None, 1, None, "regression"), (None, 10, None, "top1")):
        model = _head(op, n=n, steps=steps)
        out, = run(model, _feeds(model))
        assert detect_kind([out], output_producers(model).get("y")) == want, (op, n, steps)
    assert detect_kind([np.arange(4, dtype=np.int64)]) is None  # not floating: compared exactly


def _lstm_state_model(hidden: int = 16, steps: int = 5):
    """x [steps, N, 8] -> LSTM -> Y_h [1, N, hidden] -> Concat(Y_h, Y_c) [2, N, hidden] as the output `state`, and
    a Sigmoid head on Y_h as `p`: a streaming detector's state beside its decision."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(weights(rng, 1, 4 * hidden, 8, scale=0.5), "W"),
             numpy_helper.from_array(weights(rng, 1, 4 * hidden, hidden, scale=0.5), "R"),
             numpy_helper.from_array(weights(rng, hidden, 1), "V")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["", "h", "c"], hidden_size=hidden),
             helper.make_node("Concat", ["h", "c"], ["state"], axis=0),
             helper.make_node("Reshape", ["h", "flat"], ["h2"]),
             helper.make_node("MatMul", ["h2", "V"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"])]
    inits.append(numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat"))
    return make_model(nodes, [value("x", [steps, "N", 8])], [value("p", ["N", 1]), value("state", [2, "N", hidden])],
                      inits)


def test_a_recurrent_state_a_detectors_joined_head_and_a_pooled_embedding_are_not_class_scores():
    """Found on trained models (an int8 LSTM voice filter's hN/cN, a GRU encoder's memory, YOLOv8's output of boxes
    beside scores, a sentence encoder's mean pooling followed by a Concat): detected as 'sequence' or 'top1', an
    argmax over hidden units or anchors no task reads. A state is compared as numbers (regression, budgeted by
    SQNR); a Concat of parts made by different ops too; a Concat of one origin is that origin."""
    from tiny import run

    model = _lstm_state_model()
    feeds = {"x": np.random.default_rng(1).normal(size=(5, 64, 8)).astype(np.float32)}
    producers = output_producers(model)
    p, state = run(model, feeds)
    assert producers["state"] == "LSTM"
    assert detect_kind([state], producers["state"]) == "regression"
    assert detect_kind([p], producers["p"]) == "probability"
    kinds = resolve_kinds(["p", "state"], [[p, state]], producers)
    assert kinds["p"].budgeted and not kinds["state"].budgeted

    # YOLO-style head: boxes (a Mul of the features) beside class scores (a Sigmoid), joined on axis 1
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "Wb"], ["b"]), helper.make_node("Mul", ["b", "s"], ["boxes"]),
             helper.make_node("Conv", ["x", "Wc"], ["c"]), helper.make_node("Sigmoid", ["c"], ["scores"]),
             helper.make_node("Reshape", ["boxes", "shape4"], ["boxes2"]),
             helper.make_node("Reshape", ["scores", "shape6"], ["scores2"]),
             helper.make_node("Concat", ["boxes2", "scores2"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(weights(rng, 4, 8, 1, 1, scale=1.0), "Wb"),
             numpy_helper.from_array(weights(rng, 6, 8, 1, 1, scale=1.0), "Wc"),
             numpy_helper.from_array(np.array(16.0, np.float32), "s"),
             numpy_helper.from_array(np.array([0, 4, -1], np.int64), "shape4"),
             numpy_helper.from_array(np.array([0, 6, -1], np.int64), "shape6")]
    detector = make_model(nodes, [value("x", ["N", 8, 5, 5])], [value("y", ["N", 10, 25])], inits)
    y, = run(detector, {"x": rng.normal(size=(4, 8, 5, 5)).astype(np.float32)})
    assert output_producers(detector)["y"] == "Concat" and detect_kind([y], "Concat") == "regression"

    # features out of an activation no logit comes out of (a Relu, a mel spectrogram's Clip): numbers too
    from tiny import run as run_model
    for op in ("Relu", "Clip"):
        model = _head(op, n=10)
        out, = run_model(model, _feeds(model))
        assert detect_kind([out], output_producers(model).get("y")) == "regression", op

    # SiLU and hard-swish written as x * Sigmoid(x) (a YOLO-seg's mask prototypes [N, 32, 160, 160], found detected
    # as 'top1' over their width): features too; a gate of another value (GLU, a * sigmoid(b)) stays a Mul
    for gate, other in (("Sigmoid", "c"), ("HardSigmoid", "c"), ("Sigmoid", "b")):
        nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"]), helper.make_node("Conv", ["x", "Wc"], ["b"]),
                 helper.make_node(gate, ["c"], ["g"]), helper.make_node("Mul", ["g", other], ["y"])]
        protos = make_model(nodes, [value("x", ["N", 8, 5, 5])], [value("y", ["N", 6, 5, 5])], inits[1:2])
        y, = run(protos, {"x": rng.normal(size=(4, 8, 5, 5)).astype(np.float32)})
        found = output_producers(protos)["y"]
        assert (detect_kind([y], found) == "regression") == (other == "c"), (gate, other, found)

    # mean pooling (Div) behind a one-input Concat: still the embedding it was
    pooled = _head("LayerNormalization", n=32)
    pooled.graph.node.append(helper.make_node("Concat", ["y"], ["e"], axis=1))
    pooled.graph.output[0].name = "e"
    e, = run(pooled, _feeds(pooled))
    assert output_producers(pooled)["e"] == "LayerNormalization" and detect_kind([e], "LayerNormalization") == "embedding"


def test_producers_of_concats_sharing_their_inputs_are_found_in_linear_time():
    """A hostile chain of 60 Concats each joining the one before with itself: looking through every input again
    would take 2^60 steps; each value is looked at once."""
    import time

    nodes = [helper.make_node("Relu", ["x"], ["c0"])]
    nodes += [helper.make_node("Concat", [f"c{i}", f"c{i}"], [f"c{i + 1}"], axis=0) for i in range(60)]
    model = helper.make_model(helper.make_graph(nodes, "g", [value("x", [1, 4])], [value("c60", None)]))
    start = time.monotonic()
    assert output_producers(model)["c60"] == "Relu"
    assert time.monotonic() - start < 5


def test_an_output_shaped_like_an_input_is_a_state_the_caller_carries():
    """Found on trained streaming models (a GRU decoder's hidden_out beside its hidden input, a VAD's caches; a
    state made inside If branches hides its op): detected as class scores. An output whose declared shape is an
    input's (a static dimension in common, none different) is a state fed back: compared as numbers."""
    from tiny import run

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["h", "U"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["h_next"]), helper.make_node("MatMul", ["h_next", "V"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["p"])]
    inits = [numpy_helper.from_array(weights(rng, 8, 16, scale=0.5), "W"),
             numpy_helper.from_array(weights(rng, 16, 16, scale=0.5), "U"),
             numpy_helper.from_array(weights(rng, 16, 1), "V")]
    model = make_model(nodes, [value("x", ["N", 2, 8]), value("h", ["N", 2, 16])],
                       [value("p", ["N", 2, 1]), value("h_next", ["batch", 2, 16])], inits)
    feeds = {"x": rng.normal(size=(64, 2, 8)).astype(np.float32), "h": rng.normal(size=(64, 2, 16)).astype(np.float32)}
    p, h_next = run(model, feeds)
    kinds = resolve_kinds(["p", "h_next"], [[p, h_next]], output_producers(model))
    assert kinds["h_next"].kind == "regression" and not kinds["h_next"].budgeted
    assert kinds["p"].kind == "probability" and kinds["p"].budgeted
    # the same head without a state input: the 16 scores at each of 2 steps are a tagger's again
    plain = make_model(nodes[:1] + [helper.make_node("Identity", ["a"], ["h_next"])] + nodes[3:],
                       [value("x", ["N", 2, 8])], [value("p", ["N", 2, 1]), value("h_next", ["N", 2, 16])],
                       inits[:1] + inits[2:])
    p, h_next = run(plain, {"x": feeds["x"]})
    assert resolve_kinds(["p", "h_next"], [[p, h_next]], output_producers(plain))["h_next"].kind == "sequence"
    # a square classifier, [N, 16] in and out, is no state
    square = _head(None, n=16, k=16)
    y, = run(square, _feeds(square))
    assert output_producers(square)["y"] == "MatMul" and detect_kind([y], "MatMul") == "top1"


def _recognizer(blank: int, ids: bool = False, steps: int = 12, classes: int = 7):
    """Per-step class scores [N, steps, classes] whose `blank` class wins most steps, as a CTC recognizer's do;
    with `ids` the steps are token ids looked up in a table (a tagger, whose 'outside' class wins most steps)."""
    rng = np.random.default_rng(0)
    bias = np.zeros(classes, np.float32)
    bias[blank] = 3.0
    inits = [numpy_helper.from_array(weights(rng, 4, classes, scale=1.0), "W"), numpy_helper.from_array(bias, "B")]
    nodes = [helper.make_node("MatMul", ["f", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    if ids:
        inits.append(numpy_helper.from_array(weights(rng, 50, 4, scale=1.0), "E"))
        nodes.insert(0, helper.make_node("Gather", ["E", "x"], ["f"]))
        inputs = [value("x", ["N", steps], TensorProto.INT64)]
    else:
        nodes.insert(0, helper.make_node("Identity", ["x"], ["f"]))
        inputs = [value("x", ["N", steps, 4])]
    return make_model(nodes, inputs, [value("y", ["N", steps, classes])], inits)


def test_per_step_scores_a_blank_wins_are_ctc_unless_the_model_reads_token_ids():
    """Found on a trained OCR recognizer (PP-OCRv5 rec: a Softmax over 18385 classes at 40 steps, class 0 the
    argmax at 97% of steps): detected as 'sequence', the whole argmax path, where its text is what counts (a
    path shifted by a step reads the same). Per-step scores whose class 0 or last class wins at least half the
    steps are ctc with that blank, unless the model reads integer inputs (token ids: a tagger's 'O' wins too)."""
    from tiny import run

    rng = np.random.default_rng(1)
    for blank, want in ((0, 0), (6, -1)):
        model = _recognizer(blank)
        y, = run(model, {"x": rng.normal(size=(16, 12, 4)).astype(np.float32)})
        kind = resolve_kinds(["y"], [[y]], output_producers(model))["y"]
        assert kind.kind == "ctc" and kind.metric.blank == want and kind.budgeted, (blank, kind)
        assert kind.describe() == f"ctc:{want} (detected)"
    tagger = _recognizer(0, ids=True)
    y, = run(tagger, {"x": rng.integers(0, 50, size=(16, 12))})
    assert resolve_kinds(["y"], [[y]], output_producers(tagger))["y"].kind == "sequence"
    # a path that reads the same text agrees as ctc, not as a sequence
    path_a, path_b = np.eye(3)[[1, 1, 0, 0, 2, 0]], np.eye(3)[[1, 0, 0, 2, 0, 0]]
    ref, cand = np.stack([path_a, path_a]), np.stack([path_b, path_a])
    metric, = compare_outputs(["y"], [[ref]], [[cand]], kinds=resolve_kinds(["y"], [[ref]]))
    assert metric.task == "ctc:0 (detected)" and metric.agreement == 1.0


def test_time_major_per_step_scores_are_read_per_sample_along_axis_1():
    """The known leftover of session 12: a CRNN exported for PyTorch's CTC loss outputs [steps, batch, classes]
    (declared [T, N, C] or static [26, 1, 37] beside an input [N, ...] or [1, ...]); read batch-major, its 'samples'
    were time steps and its 'text' ran across the batch. The declared shape says where the batch is."""
    from tiny import run

    rng = np.random.default_rng(2)
    for batch, n in (("N", 16), (1, 1)):
        model = _recognizer(0)
        model.graph.node.append(helper.make_node("Transpose", ["y"], ["y_tm"], perm=[1, 0, 2]))
        model.graph.input[0].CopyFrom(value("x", [batch, 12, 4]))
        model.graph.output[0].CopyFrom(value("y_tm", [12, batch, 7]))
        producers = output_producers(model)
        assert producers.time_major == {"y_tm"}
        y, = run(model, {"x": rng.normal(size=(n, 12, 4)).astype(np.float32)})
        kind = resolve_kinds(["y_tm"], [[y]], producers)["y_tm"]
        assert kind.kind == "ctc" and kind.metric.time_major and kind.describe() == "ctc:0 time-major (detected)"
        assert resolve_kinds(["y_tm"], [[y]], producers, parse_metric("sequence"))["y_tm"].metric.time_major
    # two samples, one column each: sample 0 reads the same text by another path, sample 1 another text
    path_a, path_b, path_c = np.eye(3)[[1, 1, 0, 2]], np.eye(3)[[1, 0, 0, 2]], np.eye(3)[[1, 0, 0, 0]]
    ref, cand = np.stack([path_a, path_a], axis=1), np.stack([path_b, path_c], axis=1)  # [4 steps, 2, 3]
    kinds = {"y": resolve_kinds(["y"], [[ref]], task=parse_metric("ctc"))["y"]}
    major = {"y": type(kinds["y"])("ctc", TaskMetric("ctc", time_major=True))}
    assert compare_outputs(["y"], [[ref]], [[cand]], kinds=major)[0].agreement == 0.5
    assert compare_outputs(["y"], [[ref]], [[cand]], kinds=kinds)[0].agreement == 0.75  # batch-major: per step
    # one answer is judged per sample too: both columns read the same text; two texts are two answers
    from onnxcompress.runtime.metrics import one_answer

    assert one_answer(major["y"], [ref]) and not one_answer(major["y"], [np.stack([path_a, path_c], axis=1)])
    # batch-major outputs, a batch of one, and unnamed dimensions stay as they were
    plain = _recognizer(0)
    assert output_producers(plain).time_major == frozenset()
    plain.graph.output[0].CopyFrom(value("y", [1, 12, 7]))
    plain.graph.input[0].CopyFrom(value("x", [1, 12, 4]))
    assert output_producers(plain).time_major == frozenset()
    plain.graph.output[0].CopyFrom(value("y", ["", "", 7]))
    assert output_producers(plain).time_major == frozenset()


def test_probability_agreement_counts_decisions_at_the_threshold():
    ref = np.array([[0.1], [0.49], [0.51], [0.9]], np.float32)
    cand = np.array([[0.2], [0.52], [0.51], [0.6]], np.float32)  # one decision (0.49 -> 0.52) flips at 0.5
    metric, = compare_outputs(["p"], [[ref]], [[cand]])
    assert metric.task == "probability (detected)" and metric.agreement == pytest.approx(0.75)
    chosen = resolve_kinds(["p"], [[ref]], task=parse_metric("probability:0.7"))
    metric, = compare_outputs(["p"], [[ref]], [[cand]], kinds=chosen)  # 0.9 -> 0.6 flips at 0.7
    assert metric.task == "probability:0.7 (chosen)" and metric.agreement == pytest.approx(0.75)


def test_ctc_compares_decoded_text_and_sequence_the_whole_path():
    assert ctc_greedy(np.eye(4)[[0, 1, 1, 0, 2, 2, 3]]) == (1, 2, 3)
    path_a, path_b = np.eye(3)[[1, 1, 0, 2]], np.eye(3)[[1, 0, 0, 2]]  # same text "1 2", other path
    ref, cand = np.stack([path_a, path_a]), np.stack([path_b, path_a])
    kinds = resolve_kinds(["y"], [[ref]], task=parse_metric("ctc"))
    assert compare_outputs(["y"], [[ref]], [[cand]], kinds=kinds)[0].agreement == 1.0
    metric, = compare_outputs(["y"], [[ref]], [[cand]])  # detected: per-step scores, whole path
    assert metric.task == "sequence (detected)" and metric.agreement == 0.5


def test_embedding_agreement_is_nearest_neighbour():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 16))
    assert neighbour_agreement(ref, ref + 1e-6 * rng.normal(size=ref.shape)) == 1.0
    assert neighbour_agreement(ref, rng.normal(size=ref.shape)) < 0.3
    model = _head("LayerNormalization", n=32)
    noisy = _head("LayerNormalization", n=32, seed=5)  # other weights: other neighbours
    comparison = compare_models(model, noisy, api.prepare_data(model, _feeds(model)))
    assert comparison.outputs[0].task == "embedding (detected)" and comparison.worst_agreement() < 0.5


def test_regression_is_reported_but_budgeted_by_sqnr_unless_chosen():
    ref = np.linspace(-2, 2, 40).reshape(20, 2)
    cand = ref.copy()
    cand[0] += 1.0  # one row far off
    metric, = compare_outputs(["y"], [[ref[:, :1]]], [[cand[:, :1]]])
    assert metric.task == "regression (detected)" and metric.agreement == 0.95 and not metric.budgeted
    kinds = resolve_kinds(["y"], [[ref]], task=parse_metric("regression:0.1"))
    metric, = compare_outputs(["y"], [[ref]], [[cand]], kinds=kinds)
    assert metric.budgeted and metric.agreement == 0.95


def test_named_outputs_must_exist_and_fit():
    ref = [[np.zeros((4, 3), np.float32) + 2, np.full((4, 1), 0.3, np.float32)]]
    with pytest.raises(RecipeError, match="does not have"):
        resolve_kinds(["a", "b"], ref, task=parse_metric("probability@c"))
    with pytest.raises(RecipeError, match="cannot measure output 'a'"):
        resolve_kinds(["a", "b"], ref, task=parse_metric("probability@a"))
    kinds = resolve_kinds(["a", "b"], ref, task=parse_metric("probability@b"))
    assert kinds["b"].chosen and kinds["b"].budgeted and not kinds["a"].budgeted


def test_the_search_budget_holds_the_chosen_probability_decisions():
    model = _head("Sigmoid", n=1, k=256)
    data = {"x": np.random.default_rng(3).normal(size=(300, 256)).astype(np.float32)}
    recipe = Recipe("t", [("bitwidth", {"bits": [1, 2, 8], "sparsities": [0.0, 0.9], "min_elements": 64}),
                          ("prune", {}), ("share", {})])
    _, report = api.compress(model, recipe, data, budget={"max_drop": 1.0, "metric": "probability:0.5"})
    out, = report.validation.outputs
    assert out.task == "probability:0.5 (chosen)" and out.budgeted
    assert report.validation.worst_agreement() >= 0.99
    summary = report.passes[0].summary
    assert all(a["measured"] is not None for a in summary["end_to_end"])  # the end-to-end check counted it
    # without a search the chosen kind still measures the result
    _, report = api.compress(model, "share", data, budget={"metric": "probability:0.5"})
    assert report.validation.outputs[0].task == "probability:0.5 (chosen)"


def test_cli_validate_takes_a_metric(tmp_path, capsys):
    import onnx

    from onnxcompress.cli import main

    model = _head("Sigmoid", n=1)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", **_feeds(model))
    assert main(["validate", str(path), str(path), "--data", str(tmp_path / "d.npz"), "--metric", "probability:0.2"]) == 0
    assert "probability:0.2 (chosen)" in capsys.readouterr().out
    assert main(["validate", str(path), str(path), "--metric", "nope"]) == 2
    assert "unknown metric kind" in capsys.readouterr().err


def test_several_kinds_each_name_their_outputs():
    """A detector's scores by top-1 and its boxes by regression, in one metric; the third output is reported only."""
    rng = np.random.default_rng(0)
    scores, boxes, marks = rng.standard_normal((50, 2)), rng.standard_normal((50, 4)), rng.standard_normal((50, 10))
    task = parse_metric("top1@scores,regression:0.1@boxes")
    assert task.describe() == "top1@scores,regression:0.1@boxes"
    kinds = resolve_kinds(["boxes", "marks", "scores"], [[boxes, marks, scores]], task=task)
    assert (kinds["scores"].kind, kinds["boxes"].kind) == ("top1", "regression")
    assert kinds["scores"].budgeted and kinds["boxes"].budgeted and not kinds["marks"].budgeted
    moved = boxes.copy()
    moved[:5] += 1.0  # five samples' boxes far off, every decision the same
    got = compare_outputs(["boxes", "marks", "scores"], [[boxes, marks, scores]], [[moved, marks, scores]],
                          kinds=kinds)
    assert [m.agreement for m in got if m.budgeted] == [0.9, 1.0]
    with pytest.raises(RecipeError, match="each must name its outputs"):
        parse_metric("top1,regression@boxes")
    with pytest.raises(RecipeError, match="names an output twice"):
        parse_metric("top1@boxes,regression@boxes")
    with pytest.raises(RecipeError, match="does not have"):
        resolve_kinds(["boxes", "scores"], [[boxes, scores]], task=parse_metric("top1@scores,regression@box"))


def test_a_detectors_boxes_count_only_where_the_reference_detects_an_object():
    """regression:TOL:GATE: the boxes of rows whose reference scores say background (class 0) do not count."""
    rng = np.random.default_rng(0)
    boxes = rng.standard_normal((40, 4))
    scores = np.zeros((40, 2))
    scores[np.arange(40) % 4 == 0, 1] = 1.0  # 10 rows hold a face (class 1), 30 are background
    task = parse_metric("top1@scores,regression:0.1:scores@boxes")
    assert task.describe() == "top1@scores,regression:0.1:scores@boxes"
    kinds = resolve_kinds(["boxes", "scores"], [[boxes, scores]], task=task)
    moved = boxes.copy()
    moved[1:4] += 1.0  # three background rows' boxes far off: they do not count
    moved[0] += 1.0  # one face's box far off: one of ten faces
    got = compare_outputs(["boxes", "scores"], [[boxes, scores]], [[moved, scores]], kinds=kinds)
    assert [m.agreement for m in got] == [0.9, 1.0]
    ungated = resolve_kinds(["boxes", "scores"], [[boxes, scores]], task=parse_metric("top1@scores,regression:0.1@boxes"))
    got = compare_outputs(["boxes", "scores"], [[boxes, scores]], [[moved, scores]], kinds=ungated)
    assert got[0].agreement == pytest.approx(36 / 40)
    probability = resolve_kinds(["boxes", "p"], [[boxes, scores[:, 1:] * 0.8]],
                                task=parse_metric("probability:0.7@p,regression:0.1:p@boxes"))
    got = compare_outputs(["boxes", "p"], [[boxes, scores[:, 1:] * 0.8]], [[moved, scores[:, 1:] * 0.8]], kinds=probability)
    assert got[0].agreement == 0.9  # 0.8 >= 0.7: the same ten rows
    with pytest.raises(RecipeError, match="gates rows by outputs the model does not have"):
        resolve_kinds(["boxes", "scores"], [[boxes, scores]], task=parse_metric("top1@scores,regression:0.1:face@boxes"))


def test_the_references_nearest_rows_are_remembered_by_their_values_not_their_object():
    from onnxcompress.runtime import tasks

    rng = np.random.default_rng(3)
    ref, other = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    cand = ref + 0.3 * rng.normal(size=ref.shape)
    first = neighbour_agreement(ref, cand)
    assert tasks._remembered and np.array_equal(tasks._remembered[0][1], tasks._nearest(ref))
    assert neighbour_agreement(ref.copy(), cand) == first  # the same values: the remembered rows
    other_agreement = neighbour_agreement(other, cand)  # new values: computed again, not the remembered ones
    assert np.array_equal(tasks._remembered[0][1], tasks._nearest(other))
    assert other_agreement == float(np.mean(tasks._nearest(other) == tasks._nearest(cand)))
    assert neighbour_agreement(ref, cand) == first


def test_an_agreement_where_the_reference_gives_one_answer_everywhere_is_marked_and_reported():
    """A text detector on random inputs: its map never reaches the threshold (noise holds no text), so any
    candidate, even a broken one, 'agrees' 100%; the comparison says so instead of passing it as evidence."""
    from onnxcompress.report import comparison_text
    from onnxcompress.runtime.metrics import one_answer

    model = _head("Sigmoid", n=1)
    shifted = _head("Sigmoid", n=1, seed=7)  # other weights: other probabilities, all below 0.99999
    data = api.prepare_data(model, _feeds(model))
    comparison = compare_models(model, shifted, data, task=parse_metric("probability:0.99999"))
    out, = comparison.outputs
    assert out.agreement == 1.0 and out.one_answer
    assert "one answer" in comparison_text(comparison)
    kinds = resolve_kinds(["p"], [[np.array([[0.1], [0.2]])]], task=parse_metric("probability:0.5"))
    assert one_answer(kinds["p"], [np.array([[0.1], [0.2]])])
    assert not one_answer(kinds["p"], [np.array([[0.1], [0.7]])])
    top1 = resolve_kinds(["s"], [[np.eye(3)[[0, 0, 0]] + 0.1]])
    assert one_answer(top1["s"], [np.eye(3)[[0, 0, 0]] + 0.1]) and not one_answer(top1["s"], [np.eye(3)[[0, 1]]])
    ctc = TaskMetric("ctc")
    from onnxcompress.runtime.tasks import OutputKind
    blank = np.eye(3)[[0, 0, 0]][None].repeat(2, axis=0)  # two samples, both all blank: one (empty) text
    assert one_answer(OutputKind("ctc", ctc, chosen=True), [blank])
    texts = np.stack([np.eye(3)[[0, 1, 0]], np.eye(3)[[0, 2, 0]]])
    assert not one_answer(OutputKind("ctc", ctc, chosen=True), [texts])
    embedding = resolve_kinds(["e"], [[np.ones((4, 8))]], task=parse_metric("embedding"))
    assert not one_answer(embedding["e"], [np.ones((4, 8))])  # neighbours, not answers: never flagged
