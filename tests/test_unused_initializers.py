"""An initializer no node reads (exporters leave them behind): onnxruntime drops it while it loads a graph, so
handing it the tensor as an in-memory array failed ('Failed to find existing initializer'), and int8 refused
the valid model as if it were the user's fault. Seen on a dynamo-exported BERT, whose int8 also left one."""
import numpy as np
import pytest
from onnx import numpy_helper

import onnxcompress.api as oc
from onnxcompress.runtime.sessions import detached, make_session
from tiny import gemm


def _with_unused():
    model = gemm(k=256, n=64)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((128, 128), np.float32), "unused_W"))
    return model


def test_a_session_with_in_memory_weights_builds_beside_an_unused_initializer():
    light, arrays = detached(_with_unused())
    assert "unused_W" not in arrays and "unused_W" not in {t.name for t in light.graph.initializer}
    x = np.ones((2, 256), np.float32)
    assert make_session(light, arrays=arrays).run(None, {"x": x})[0].shape == (2, 64)


@pytest.mark.parametrize("recipe", ["int8", "share-4bit", "deep-compression"])
def test_recipes_with_data_run_beside_an_unused_initializer(recipe):
    model = _with_unused()
    data = {"x": np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)}
    out, report = oc.compress(model, recipe, data)
    assert report.validation.outputs[0].agreement >= 0.9  # it ran end to end and was measured in onnxruntime
    assert "unused_W" in {t.name for t in out.graph.initializer}  # the user's tensors are theirs
