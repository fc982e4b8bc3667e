"""Inputs that are not tensors (red team, round 9): a sequence- or optional-typed graph input has no shape to
synthesize and no data file can hold a sequence; every recipe refused such a model ("input 's' has no declared
shape; give --shape s=... or --data", though neither could help). onnxruntime runs it with an empty sequence
and without the optional, so we do too; the output keeps the inputs as they were.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxcompress.api as oc
from test_hostile import _fails_cleanly
from tiny import gemm


def _with_odd_inputs() -> onnx.ModelProto:
    model = gemm()
    tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    model.graph.input.extend([
        helper.make_value_info("s", helper.make_sequence_type_proto(tensor)),
        helper.make_value_info("o", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [3]))),
        helper.make_value_info("q", helper.make_optional_type_proto(helper.make_sequence_type_proto(tensor)))])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("recipe, data", [("share", False), ("int8", True), ("int8-weights", False)])
def test_unused_sequence_and_optional_inputs_compress(tmp_path, recipe, data):
    model = _with_odd_inputs()
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    out, report = oc.compress(model, recipe, data={"x": x} if data else None)
    assert [i.name for i in out.graph.input] == ["x", "s", "o", "q"]
    assert report.output_bytes < report.input_bytes
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x, "s": []})[0]
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "s": []})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert oc.validate(model, out, {"x": x}).outputs[0].cosine > 0.99


def test_data_may_feed_the_optional_input_but_not_the_sequence(tmp_path, capsys):
    model = _with_odd_inputs()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    given = oc.validate(model, model, [{"x": x[i:i + 1], "o": np.zeros(3, np.float32)} for i in range(4)])
    assert given.samples == 4
    data = tmp_path / "d.npz"
    np.savez(data, x=x, s=x)
    err = _fails_cleanly(capsys, tmp_path, path, "--data", str(data), "-q")
    assert "input 's' is a sequence of tensors, which data files cannot hold" in err
