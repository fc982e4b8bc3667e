"""Hostile sizes, session 13: small files whose counts (nodes, initializers, subgraphs, outputs, name lengths)
made our walks quadratic, or whose declarations asked for huge work. Each command finishes in time about linear in
the file, or refuses with one line. Complexity tests bound process time loosely: the broken walks took minutes.
"""
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import inspect
from onnxcompress.graph.weights import find_weights, nonfinite_weights
from test_hostile_paths import _refused, _rewrite_external, _with_external
from tiny import value


def _many_constants(count: int, *, in_branches: bool) -> onnx.ModelProto:
    """x @ W, then `count` Adds of a one-element constant: each an initializer of the main graph, or of the then
    branch of its own If (else the identity)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    nodes, inits = [helper.make_node("MatMul", ["x", "W"], ["t0"])], [w]
    for i in range(count):
        c = numpy_helper.from_array(np.full([1], i, np.float32), f"c{i}")
        if not in_branches:
            inits.append(c)
            nodes.append(helper.make_node("Add", [f"t{i}", f"c{i}"], [f"t{i + 1}"]))
            continue
        then = helper.make_graph([helper.make_node("Add", [f"t{i}", f"c{i}"], [f"a{i}"])], f"then{i}", [],
                                 [value(f"a{i}", None)], [c])
        other = helper.make_graph([helper.make_node("Identity", [f"t{i}"], [f"e{i}"])], f"else{i}", [],
                                  [value(f"e{i}", None)])
        nodes.append(helper.make_node("If", ["c"], [f"t{i + 1}"], then_branch=then, else_branch=other))
    nodes.append(helper.make_node("Identity", [f"t{count}"], ["y"]))
    inputs = [value("x", [1, 64])] + ([value("c", [], TensorProto.BOOL)] if in_branches else [])
    graph = helper.make_graph(nodes, "g", inputs, [value("y", [1, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_many_constants_are_read_in_one_walk():
    """inspect and the start of every compress read each constant tensor by scanning its graph for it: 2*10^4
    one-element initializers (1 MB) took 170 s, 10^5 over an hour; 5000 in If branches (each found by walking
    every graph) over 5 minutes. Now one walk: seconds."""
    for count, in_branches in ((20_000, False), (3_000, True)):
        model = _many_constants(count, in_branches=in_branches)
        started = time.process_time()
        report = inspect(model, min_elements=0)
        weights = find_weights(model, min_elements=0)
        assert nonfinite_weights(model, weights) == []
        assert time.process_time() - started < 30  # was minutes
        assert len(report["weights"]) == count + 1
        assert report["weights"][-1]["distinct"] == 1 and report["weights"][-1]["name"] == f"c{count - 1}"
        assert report["weights"][1]["sparsity"] == 1.0  # c0 holds 0


@pytest.mark.parametrize("case", ["name-too-long", "through-a-file"])
@pytest.mark.parametrize("command", ["compress", "inspect"])
def test_an_external_location_no_file_can_have_is_one_line(tmp_path, capsys, case, command):
    """A location of 5000 characters (the OS refuses names over 255) was an OSError, exit 1 asking for a report;
    one going through a file as if a folder was called missing. Now one short line, exit 2, nothing written."""
    path = _with_external(tmp_path)
    if case == "name-too-long":
        _rewrite_external(path, location="a" * 5000)
    else:
        _rewrite_external(path, location="m.onnx/w.data")
    argv = {"compress": ["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--jobs", "1"],
            "inspect": ["inspect", str(path)]}[command]
    err = _refused(capsys, tmp_path, argv)
    assert ("5000 characters" in err and len(err) < 600) if case == "name-too-long" else "Not a directory" in err, err
