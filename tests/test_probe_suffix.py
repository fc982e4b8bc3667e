"""The output gains' probes through suffixes shared by groups of weights (runtime.probe_suffix): the groups,
the same gains as whole-model probes, fewer nodes run, one group's cut values held, the fallbacks."""
from __future__ import annotations


import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxcompress.graph.data import Dataset
from tiny import make_model, value


def _chain(layers: int = 6, width: int = 8):
    """x -> (MatMul w_i -> Relu) x layers -> y, the last MatMul without a Relu; r1 also -> Add -> y2 (an output
    upstream of every weight but w1)."""
    rng = np.random.default_rng(3)
    nodes, inits, src = [], [], "x"
    for i in range(1, layers + 1):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                             f"w{i}"))
        out = "y" if i == layers else f"h{i}"
        nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [out], name=f"m{i}"))
        if i < layers:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            src = f"r{i}"
    nodes.append(helper.make_node("Add", ["r1", "r1"], ["y2"], name="add"))
    return make_model(nodes, [value("x", ["N", width])], [value("y", ["N", width]), value("y2", ["N", width])], inits)


def _data(n=32, width=8):
    return Dataset(stacked={"x": np.random.default_rng(5).standard_normal((n, width)).astype(np.float32)})


def _probes(model, data, bits=2):
    from test_sensitivity import probes_for
    return probes_for(model, data, bits, named=lambda name: True)[2]


def test_groups_join_weights_while_the_shared_suffix_stays_within_the_slack():
    """|suffix(w_i)| = 11 - 2 (i - 1) nodes of 12 (the Add reads r1, downstream of w1 only): w2 joins w1 (12 <=
    1.5 x 10), w3 does not (12 > 1.5 x 8), w4 joins w3 (8 <= 1.5 x 6), w5 and w6 stand alone."""
    from onnxcompress.runtime.probe_suffix import suffix_groups
    model = _chain()
    assert suffix_groups(model.graph, [f"w{i}" for i in (6, 2, 4, 1, 3, 5)]) == \
        [["w1", "w2"], ["w3", "w4"], ["w5"], ["w6"]]
    assert suffix_groups(model.graph, ["w1", "w6"], slack=100.0) == [["w1", "w6"]]
    assert suffix_groups(model.graph, [f"w{i}" for i in range(1, 7)], slack=0.0) == [[f"w{i}"] for i in range(1, 7)]


def _gains(monkeypatch, model, data, probes, *, suffixes: bool, **patch):
    from onnxcompress.runtime import probe_suffix, sensitivity
    monkeypatch.setattr(sensitivity, "SUFFIX_SECONDS", -1.0 if suffixes else float("inf"))
    for name, v in patch.items():
        monkeypatch.setattr(probe_suffix, name, v)
    made = []
    init = probe_suffix.SuffixProbes.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(probe_suffix.SuffixProbes, "__init__", recorded)
    gains = sensitivity.measure_gains(model, data, probes, samples=32)
    monkeypatch.undo()
    return gains, made


def _same(a, b):
    assert set(a) == set(b) and a
    for name in a:
        assert np.isclose(a[name].rest, b[name].rest, rtol=1e-4), name
        assert np.isclose(a[name].mean, b[name].mean, rtol=1e-4), name


def test_suffix_probes_give_the_whole_models_gains_running_fewer_nodes(monkeypatch):
    """Each group's probes run its suffix only (w1 + w2's is nearly the whole model: those run it whole), fed
    the values at its cut, which run from the previous group's held ones; the shared collector keeps its one
    session and the cost it measured."""
    from onnxcompress.runtime.statistics import Collector
    model, data = _chain(), _data()
    probes = _probes(model, data)
    whole, _ = _gains(monkeypatch, model, data, probes, suffixes=False)
    collector = Collector()
    from onnxcompress.runtime import sensitivity
    monkeypatch.setattr(sensitivity, "SUFFIX_SECONDS", -1.0)
    run = sensitivity.measure_gains(model, data, probes, samples=32, collector=collector)
    monkeypatch.undo()
    _same(whole, run)
    assert collector.built == 1 and collector.seconds_per_sample(model) is not None
    _, made = _gains(monkeypatch, model, data, probes, suffixes=True)
    suffixes = made[0]
    # w3, w4's suffix: 8 nodes, w5's 4, w6's 1, each run per chunk by every probe of its weights
    assert 0 < suffixes.nodes_run < 8 * 2 * 4 * (32 // sensitivity.GAIN_CHUNK)
    assert suffixes.segments.nodes_run <= 2 * 5 * (32 // sensitivity.GAIN_CHUNK)  # r2, r4, h5: each node once a chunk


def test_cut_values_over_the_bound_or_a_refused_suffix_run_the_whole_model(monkeypatch):
    from onnxcompress.errors import ModelError
    from onnxcompress.runtime import probe_suffix
    model, data = _chain(), _data()
    probes = _probes(model, data)
    whole, _ = _gains(monkeypatch, model, data, probes, suffixes=False)
    bounded, made = _gains(monkeypatch, model, data, probes, suffixes=True, HELD_BYTES=16)
    _same(whole, bounded)
    assert made[0].nodes_run == 0

    def refused(*args, **kwargs):
        raise ModelError("no")
    refusing, made = _gains(monkeypatch, model, data, probes, suffixes=True, make_session=refused)
    _same(whole, refusing)
    assert made[0].nodes_run == 0


@pytest.mark.parametrize("order", [["w6", "w3"], ["w3", "w6", "w4"]])
def test_a_weight_of_an_earlier_group_asked_again_still_gets_its_suffix(order):
    """Groups are probed in order, each letting the earlier groups' values go; one asked again later runs from
    the feeds (the same moves)."""
    from onnxcompress.runtime.probe_suffix import SuffixProbes, suffix_groups
    from onnxcompress.runtime.statistics import weights_as_inputs
    model, data = _chain(), _data()
    feeds = data.limit(32)
    _, arrays = weights_as_inputs(model)
    probes = SuffixProbes(model, feeds, ["y", "y2"], suffix_groups(model.graph, [f"w{i}" for i in range(1, 7)]),
                          chunk=4)
    version = {w: (arrays[w] * 1.1).astype(np.float32) for w in arrays}
    first = {w: [m for m in probes.moves(w, version[w])] for w in order}
    again = {w: [m for m in probes.moves(w, version[w])] for w in order}
    for w in order:
        assert len(first[w]) == 32 // 4
        for a, b in zip(first[w], again[w]):
            assert a[1] is None and b[1] is None  # y2 is upstream of w3..w6
            np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-7)
            assert np.any(a[0] != 0)
