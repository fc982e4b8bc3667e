"""Stateful models fed streams: the data's chains are found, and every judging run carries each model's own
states from call to call (runtime/streams.py, graph.stream.StateCarry)."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.api import compress, prepare_data
from onnxcompress.graph.data import Dataset
from onnxcompress.graph.stream import Stream
from onnxcompress.graph.weights import find_weights
from onnxcompress.runtime.metrics import compare_models
from onnxcompress.runtime.sessions import make_session, run
from onnxcompress.runtime.statistics import Collector
from onnxcompress.runtime.streams import detect_stream

from tiny import make_model, value, weights

HIDDEN, FEATURES = 24, 6


def recurrent(seed: int = 0, *, leak: float = 1.0) -> onnx.ModelProto:
    """h' = tanh(x W + (leak h) U + b); y = h' V: one state in (h), one out (h_out), as a streaming RNN."""
    rng = np.random.default_rng(seed)
    u = (np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))[0] * 0.95).astype(np.float32)
    inits = [numpy_helper.from_array(weights(rng, FEATURES, HIDDEN, scale=0.5), "W"),
             numpy_helper.from_array(u * leak, "U"), numpy_helper.from_array(weights(rng, HIDDEN), "b"),
             numpy_helper.from_array(weights(rng, HIDDEN, 3, scale=0.5), "V")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("MatMul", ["h", "U"], ["hu"]),
             helper.make_node("Add", ["xw", "hu"], ["s"]), helper.make_node("Add", ["s", "b"], ["t"]),
             helper.make_node("Tanh", ["t"], ["h_out"]), helper.make_node("MatMul", ["h_out", "V"], ["y"])]
    return make_model(nodes, [value("x", [1, FEATURES]), value("h", [1, HIDDEN])],
                      [value("y", [1, 3]), value("h_out", [1, HIDDEN])], inits)


def streamed_feeds(model, chains: int = 3, calls: int = 12, seed: int = 1) -> list[dict]:
    """Feeds recorded from streaming `model`: each chain starts at a zero state, later calls take the state
    the model reached."""
    session, rng, feeds = make_session(model), np.random.default_rng(seed), []
    for _ in range(chains):
        h = np.zeros((1, HIDDEN), np.float32)
        for _ in range(calls):
            feed = {"x": rng.standard_normal((1, FEATURES)).astype(np.float32), "h": h}
            feeds.append(feed)
            h = session.run(["h_out"], feed)[0]
    return feeds


def manual_stream(model, feeds, continues) -> list[list[np.ndarray]]:
    session, out, h = make_session(model), [], None
    for feed, cont in zip(feeds, continues):
        feed = {**feed, "h": h} if cont else feed
        y, h = session.run(["y", "h_out"], feed)
        out.append([y, h])
    return out


def perturbed(model, scale: float = 0.05, seed: int = 5) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in copy.graph.initializer:
        if t.name == "U":
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a + scale * rng.standard_normal(a.shape)).astype(np.float32), "U"))
    return copy


def test_recorded_streams_are_found_with_their_links_and_chain_starts():
    model = recurrent()
    stream = detect_stream(model, Dataset(streamed_feeds(model, chains=3, calls=12)))
    assert stream is not None
    assert stream.links == (("h", "h_out"),)
    assert stream.chains == 3
    assert [i for i, c in enumerate(stream.continues) if not c] == [0, 12, 24]


def test_independent_calls_are_not_a_stream():
    model = recurrent()
    rng = np.random.default_rng(0)
    zero = [{"x": rng.standard_normal((1, FEATURES)).astype(np.float32), "h": np.zeros((1, HIDDEN), np.float32)}
            for _ in range(10)]
    noise = [{**f, "h": rng.standard_normal((1, HIDDEN)).astype(np.float32)} for f in zero]
    assert detect_stream(model, Dataset(zero)) is None
    assert detect_stream(model, Dataset(noise)) is None


def test_a_model_without_state_shaped_outputs_is_not_probed(monkeypatch):
    from onnxcompress.runtime import streams
    from tiny import gemm

    monkeypatch.setattr(streams, "make_session", lambda *a, **k: pytest.fail("no session needed"))
    model = gemm(8, 4)
    assert detect_stream(model, Dataset([{"x": np.ones((1, 8), np.float32)}] * 3)) is None


def test_every_judging_run_carries_the_candidates_own_states():
    model = recurrent()
    feeds = streamed_feeds(model)
    data = Dataset(feeds)
    data.stream = detect_stream(model, data)
    candidate = perturbed(model)
    want = manual_stream(candidate, feeds, data.stream.continues)
    per_call = [make_session(candidate).run(["y", "h_out"], f) for f in feeds]
    # the state error compounds along a chain: streamed outputs differ from per-call ones after the first call
    assert not np.allclose(want[5][0], per_call[5][0], atol=1e-6)

    got = run(make_session(candidate), data, candidate, output_names=["y"])
    np.testing.assert_allclose(np.concatenate([g[0] for g in got]), np.concatenate([w[0] for w in want]), atol=1e-6)

    chunks = list(Collector().runner(candidate, ["y"]).chunks(data))
    np.testing.assert_allclose(np.concatenate([c.values["y"] for c in chunks]),
                               np.concatenate([w[0] for w in want]), atol=1e-6)


def test_the_search_evaluator_streams_each_candidate():
    from passes.bitsearch import Evaluator

    model = recurrent()
    feeds = streamed_feeds(model)
    data = Dataset(feeds)
    data.stream = detect_stream(model, data)
    infos = [w for w in find_weights(model) if w.name == "U"]
    seen = {}
    evaluator = Evaluator(model, infos, data, lambda names, ref, cand, d: seen.update(ref=ref, cand=cand) or {})
    u = numpy_helper.to_array(perturbed(model).graph.initializer[1])
    evaluator.measure({"U": [u]})
    want = manual_stream(perturbed(model), feeds, data.stream.continues)
    y = evaluator.names.index("y")
    np.testing.assert_allclose(np.concatenate([c[y] for c in seen["cand"]]),
                               np.concatenate([w[0] for w in want]), atol=1e-6)


def test_validation_of_a_stream_judges_the_streamed_outputs_and_says_so():
    model = recurrent()
    feeds = streamed_feeds(model, chains=4, calls=16)
    data = prepare_data(model, feeds)
    assert data.stream is not None and data.stream.chains == 4
    candidate = perturbed(model, scale=0.03)
    streamed = compare_models(model, candidate, data)
    per_call = compare_models(model, candidate, Dataset(feeds))
    y = next(o for o in streamed.outputs if o.name == "y")
    y_call = next(o for o in per_call.outputs if o.name == "y")
    assert y.sqnr_db < y_call.sqnr_db  # the compounded state error shows

    compressed, report = compress(model, "int8-weights", data=feeds)
    assert any("stream(s) of 64 calls" in n for n in report.notes)
    assert report.validation is not None


def test_a_subset_keeps_the_chains_of_consecutive_calls_only():
    stream = Stream((("h", "h_out"),), (False, True, True, False, True))
    data = Dataset([{"x": np.zeros(1)}] * 5)
    data.stream = stream
    assert data.limit(3).stream.continues == (False, True, True)
    assert data.subset(slice(1, 5)).stream.continues == (False, True, False, True)
    assert data.subset(slice(0, 5, 2)).stream is None  # interleaved calls: each on the states it was given
    assert data.subset(slice(2, 4)).stream is None
    assert [count for _, count in data.chunks([], max_batch=64)] == [1] * 5
