"""Synthesized inputs the original runs on: symbolic dims sized from the weights or a ladder, up front."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.api import compress
from onnxcompress.errors import DataError
from onnxcompress.graph.data import model_inputs
from onnxcompress.runtime.synthesis import runnable_data
from tiny import gemm, make_model, value, weights


def _feature_model() -> onnx.ModelProto:
    """x (T, F) with both dims symbolic; F must be 138 for the MatMul (as madmom's feature inputs)."""
    rng = np.random.default_rng(0)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [value("x", ["T", "F"])], [value("y", ["T", 16])],
                      [numpy_helper.from_array(weights(rng, 138, 16), "w")])


def _image_model() -> onnx.ModelProto:
    """x (1, 3, H, W): a 3x3 conv and an 8x8 max pool fail at 1x1 (onnxruntime runs them from 8x8 on)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[8, 8], strides=[8, 8])]
    return make_model(nodes, [value("x", [1, 3, "H", "W"])], [value("y", [1, 4, "h", "w"])],
                      [numpy_helper.from_array(weights(rng, 4, 3, 3, 3), "w")])


def test_a_feature_dim_is_sized_from_the_weights():
    model = _feature_model()
    data = runnable_data(model, model_inputs(model))
    assert data.feed(0, model_inputs(model))["x"].shape == (1, 138)
    assert data.guessed == ["x"] and "x=1,138" in data.note


def test_image_sides_are_sized_from_the_ladder():
    model = _image_model()
    shape = runnable_data(model, model_inputs(model)).feed(0, model_inputs(model))["x"].shape
    assert shape[:2] == (1, 3) and shape[2] == shape[3] and shape[2] >= 8


def test_given_shapes_are_kept_and_a_model_that_runs_with_ones_is_not_probed_further():
    model = gemm(k=64, n=32)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    data = runnable_data(model, model_inputs(model))
    assert data.feed(0, model_inputs(model))["x"].shape == (1, 64) and data.note is None
    with pytest.raises(DataError, match="does not run on synthesized inputs"):
        runnable_data(_feature_model(), model_inputs(_feature_model()), shapes={"x": (1, 5)})


def test_compress_without_data_on_a_symbolic_feature_model_runs_and_says_how():
    compressed, report = compress(_feature_model(), "int8-weights")
    assert any("x=1,138" in note for note in report.notes)
    assert report.validation is not None


def test_nothing_is_synthesized_or_probed_when_nothing_is_validated(monkeypatch):
    """--validate none without data builds no onnxruntime session of the original (a 3 GB model's would hold it all
    in memory) and synthesizes nothing; the same model validated at the end is probed as above."""
    import onnxcompress.runtime.synthesis as synthesis

    probes = []
    real = synthesis.make_session
    monkeypatch.setattr(synthesis, "make_session", lambda *a, **k: probes.append(1) or real(*a, **k))
    compressed, report = compress(_feature_model(), "int8-weights", validate="none")
    assert probes == [] and report.validation is None
    assert not any("x=1,138" in note for note in report.notes)
    compress(_feature_model(), "int8-weights")
    assert probes
