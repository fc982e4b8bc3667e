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
    "resnet_bn": ("mnist", [1, 28, 28], 0.969),
    "dwsep_bnfold": ("mnist", [1, 28, 28], 0.967),
    "lstm_rows": ("rows", [28, 28], 0.958),
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


@pytest.mark.parametrize("prefix", ["mnist", "rows"])
def test_test_data_is_held_out(prefix):
    """The calibration images (training set) and the test images do not overlap."""
    calib = np.load(SAMPLES / f"{prefix}_calib.npz")["input"].reshape(500, -1)
    test = np.load(SAMPLES / f"{prefix}_test.npz")["input"].reshape(1000, -1)
    assert not {c.tobytes() for c in calib} & {t.tobytes() for t in test}


def test_rows_data_is_mnist_by_rows():
    for split in ("calib", "test"):
        rows = np.load(SAMPLES / f"rows_{split}.npz")["input"]
        assert np.array_equal(rows, np.load(SAMPLES / f"mnist_{split}.npz")["input"][:, 0])


def _ops(name):
    return [n.op_type for n in onnx.load(SAMPLES / f"{name}.onnx").graph.node]


def test_resnet_bn_keeps_batchnorm_and_residuals():
    ops = _ops("resnet_bn")
    assert ops.count("BatchNormalization") == ops.count("Conv") == 6
    assert ops.count("Add") >= 2


def test_dwsep_bnfold_is_folded_depthwise():
    model = onnx.load(SAMPLES / "dwsep_bnfold.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    groups = [a.i for n in model.graph.node if n.op_type == "Conv"
              for a in n.attribute if a.name == "group"]
    assert sum(g > 1 for g in groups) == 5  # MobileNet-style: five depthwise + pointwise blocks
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(n.input[2] in inits for n in model.graph.node if n.op_type == "Conv")  # folded bias
    assert 100_000 <= sum(a.size for a in inits.values()) <= 300_000
    # folding spreads the depthwise channels' ranges: largest / smallest per-channel max |w| of 10x or more
    dw = inits["conv6_dw.weight"]
    per_channel = np.abs(dw).reshape(len(dw), -1).max(1)
    assert per_channel.max() / per_channel.min() > 10


def test_lstm_rows_uses_one_onnx_lstm():
    model = onnx.load(SAMPLES / "lstm_rows.onnx")
    (lstm,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lstm.attribute}
    assert attrs["hidden_size"] == 64
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert [shapes[i] for i in lstm.input[1:4]] == [[1, 256, 28], [1, 256, 64], [1, 512]]


# the Deep Compression paper's bars (Han et al. 2016): whole-file ratio with no loss of accuracy,
# read here as at most 1 point of test accuracy; the recipe sees only the unlabelled calibration split
PAPER_BARS = {"lenet300": 40.0, "lenet5": 39.0}


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_BARS)
def test_deep_compression_meets_the_papers_bar(name, tmp_path):
    from onnxcompress import api

    out = tmp_path / f"{name}.packed.onnx"
    report = api.compress_file(SAMPLES / f"{name}.onnx", out, "deep-compression", data=SAMPLES / "mnist_calib.npz",
                               progress=False)
    ratio = (SAMPLES / f"{name}.onnx").stat().st_size / out.stat().st_size
    portable = api.unpack(onnx.load(out))
    test = np.load(SAMPLES / "mnist_test.npz")
    x, labels = test["input"], test["labels"]
    original = _session(name).run(["logits"], {"input": x})[0]
    sess = ort.InferenceSession(portable.SerializeToString(), providers=["CPUExecutionProvider"])
    compressed = sess.run(["logits"], {"input": x})[0]
    drop = 100 * (float((original.argmax(1) == labels).mean()) - float((compressed.argmax(1) == labels).mean()))
    assert report.passes[0].name == "bitwidth" and ratio >= PAPER_BARS[name], f"{name}: {ratio:.1f}x"
    assert drop <= 1.0, f"{name}: {drop:.2f} points lost at {ratio:.1f}x"
