"""The committed sample models load in onnxruntime, have the documented interface, and
still classify their held-out data about as well as when they were made
(see samples/README.md; regenerate with ``python samples/make_samples.py``)."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

# model -> (data prefix, input shape without batch, accuracy floor: measured minus ~1 point)
MODELS = {
    "lenet300": ("mnist", [1, 28, 28], 0.959),
    "lenet5": ("mnist", [1, 28, 28], 0.974),
}


def _session(name):
    return ort.InferenceSession(str(SAMPLES / f"{name}.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", MODELS)
def test_interface(name):
    prefix, shape, _ = MODELS[name]
    model = onnx.load(SAMPLES / f"{name}.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert {(o.domain or "ai.onnx"): o.version for o in model.opset_import} == {"ai.onnx": 21}
    sess = _session(name)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("input", "tensor(float)", ["batch", *shape])
    assert (out.name, out.type, out.shape) == ("logits", "tensor(float)", ["batch", 10])
    calib = np.load(SAMPLES / f"{prefix}_calib.npz")
    assert calib["input"].dtype == np.float32 and calib["input"].shape == (500, *shape)
    assert sess.run(None, {"input": calib["input"][:3]})[0].shape == (3, 10)


@pytest.mark.parametrize("name", MODELS)
def test_accuracy_above_floor(name):
    prefix, shape, floor = MODELS[name]
    test = np.load(SAMPLES / f"{prefix}_test.npz")
    x, labels = test["input"], test["labels"]
    assert x.dtype == np.float32 and x.shape == (1000, *shape)
    assert labels.dtype == np.int64 and labels.shape == (1000,)
    logits = _session(name).run(["logits"], {"input": x})[0]
    accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy >= floor, f"{name}: accuracy {accuracy:.4f} below floor {floor}"


def test_test_data_is_held_out():
    """The calibration images (training set) and the test images do not overlap."""
    calib = np.load(SAMPLES / "mnist_calib.npz")["input"].reshape(500, -1)
    test = np.load(SAMPLES / "mnist_test.npz")["input"].reshape(1000, -1)
    shared = {c.tobytes() for c in calib} & {t.tobytes() for t in test}
    assert not shared
