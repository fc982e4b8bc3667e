"""Small random-weight models exported the way the models users bring are exported (tf2onnx, torch's legacy and
dynamo exporters, paddle2onnx), in the shapes of real ones nobody here chose: for benchmarks/sweep.py.

    python benchmarks/exported/make.py OUT_FOLDER [--only NAME ...]
    python benchmarks/sweep.py OUT_FOLDER --recipes share int8 ... [--data 8]

Exporters are not dependencies of onnxcompress: install them in a separate environment (torch from its CPU
index, tensorflow-cpu + tf2onnx, paddlepaddle + paddle2onnx; see docs/realmodels.md). A family whose exporter is
missing, or fails, is skipped with one line saying why; the others are still written. The weights are random
(seeded), so only the graph's shape matters: which ops, where the weights sit (initializers, Constant nodes,
If branches, LSTM W/R/B, tied tensors), opsets, dtypes, state inputs and outputs.

Families (file names): keras_conv1d_op13/op17 (Conv1D/Dense/softmax, tf2onnx), crnn_legacy/crnn_dynamo (conv +
bidirectional LSTM + CTC log-softmax head, torch), stream_gru_if (GRU + LSTM with state in and out and an If on a
scalar sample rate whose branches hold their own weights, torch script), paddle_ocr_cls (depthwise convs,
BatchNorm, hardswish, paddle2onnx), paddle_style_constants (the same kind of net from torch, its weights moved
into Constant nodes as paddle2onnx writes some), bert_tiny_op14/op11/fp16 (attention mask, LayerNorm, GELU,
Gather embeddings; torch legacy), bert_tiny_dynamo, db_detector (strided convs, FPN upsampling, ConvTranspose,
sigmoid map, dynamic height and width, weights in Constant nodes).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

SEED = 0


def _torch_export(module, args, path: Path, *, opset: int, names_in, names_out, dynamic=None, dynamo=False):
    import torch

    module.eval()
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(module, args, str(path), opset_version=opset, input_names=names_in,
                              output_names=names_out, dynamo=True, external_data=False)
        else:
            torch.onnx.export(module, args, str(path), opset_version=opset, input_names=names_in,
                              output_names=names_out, dynamic_axes=dynamic, dynamo=False)


# ---- torch families ------------------------------------------------------------------------------

def crnn(folder: Path) -> None:
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self, classes: int = 37):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.MaxPool2d((2, 1)), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
            self.rnn = nn.LSTM(64 * 8, 64, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(128, classes)

        def forward(self, x):  # x: (N, 1, 32, W)
            f = self.conv(x)  # (N, 64, 8, W/2)
            n, c, h, w = f.shape
            f = f.permute(0, 3, 1, 2).reshape(n, w, c * h)
            seq, _ = self.rnn(f)
            return self.head(seq).log_softmax(-1)

    torch.manual_seed(SEED)
    model, x = CRNN(), torch.randn(1, 1, 32, 100)
    _torch_export(model, (x,), folder / "crnn_legacy.onnx", opset=13, names_in=["image"], names_out=["logits"],
                  dynamic={"image": {0: "N", 3: "W"}, "logits": {0: "N", 1: "T"}})
    _try("crnn_dynamo", lambda: _torch_export(model, (x,), folder / "crnn_dynamo.onnx", opset=18,
                                              names_in=["image"], names_out=["logits"], dynamo=True))


def stream_gru_if(folder: Path) -> None:
    """A streaming voice detector's shape: audio chunk + GRU/LSTM state in, probability + state out, the sample
    rate a scalar input choosing between two branches that hold their own weights (an If)."""
    import torch
    from torch import nn

    class Branch(nn.Module):
        def __init__(self, hop: int):
            super().__init__()
            self.hop = hop
            self.front = nn.Conv1d(1, 32, hop * 2, stride=hop)
            self.proj = nn.Linear(32, 48)

        def forward(self, x):
            return torch.relu(self.proj(torch.relu(self.front(x.unsqueeze(1))).transpose(1, 2)))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.b16, self.b8 = Branch(16), Branch(8)
            self.gru = nn.GRU(48, 48, batch_first=True)
            self.lstm = nn.LSTM(48, 48, batch_first=True)
            self.out = nn.Linear(48, 1)

        def forward(self, x, sr, h, c):
            if bool(sr == 16000):
                f = self.b16(x)
            else:
                f = self.b8(x)
            g, h_out = self.gru(f, h[0:1])
            s, (h2, c_out) = self.lstm(g, (h[1:2], c))
            p = torch.sigmoid(self.out(s[:, -1]))
            return p, torch.cat([h_out, h2], 0), c_out

    torch.manual_seed(SEED)
    model = torch.jit.script(Detector())
    args = (torch.randn(1, 512), torch.tensor(16000), torch.zeros(2, 1, 48), torch.zeros(1, 1, 48))
    _torch_export(model, args, folder / "stream_gru_if.onnx", opset=16, names_in=["audio", "sr", "h", "c"],
                  names_out=["prob", "hn", "cn"])


def paddle_style_constants(folder: Path) -> None:
    """A PP-LCNet-like classifier (depthwise separable convs, BatchNorm, hardswish, SE) from torch, then every
    initializer moved into a Constant node (as paddle2onnx writes weights in some models)."""
    import torch
    from torch import nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                             nn.Hardswish(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
            self.body = nn.Sequential(block(16, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2))
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(128, 32, 1), nn.ReLU(), nn.Conv2d(32, 128, 1),
                                    nn.Hardsigmoid())
            self.fc = nn.Linear(128, 2)

        def forward(self, x):
            f = self.body(self.stem(x))
            f = f * self.se(f)
            return torch.softmax(self.fc(f.mean((2, 3))), -1)

    torch.manual_seed(SEED)
    net = Net()
    for m in net.modules():  # BatchNorm statistics as a trained net has them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.2, 3.0), m.weight.data.uniform_(0.3, 2)
    path = folder / "paddle_style_constants.onnx"
    _torch_export(net, (torch.randn(1, 3, 48, 192),), path, opset=11, names_in=["x"], names_out=["probs"],
                  dynamic={"x": {0: "N"}, "probs": {0: "N"}})
    _to_constants(path)


def db_detector(folder: Path) -> None:
    """An OCR text detector's shape (DB: strided convs, an FPN of nearest upsampling + adds, ConvTranspose back to
    full size, sigmoid map), height and width dynamic, every weight a Constant node as paddle2onnx writes them."""
    import torch
    from torch import nn

    class DB(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
            self.c3 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
            self.l3, self.l2 = nn.Conv2d(64, 32, 1), nn.Conv2d(32, 32, 1)
            self.head = nn.Sequential(nn.Conv2d(32, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.ConvTranspose2d(16, 8, 2, 2), nn.ReLU(), nn.ConvTranspose2d(8, 1, 2, 2))

        def forward(self, x):
            f2 = self.c2(self.c1(x))
            f3 = self.c3(f2)
            p = self.l2(f2) + nn.functional.interpolate(self.l3(f3), scale_factor=2.0, mode="nearest")
            return torch.sigmoid(self.head(p))

    torch.manual_seed(SEED)
    path = folder / "db_detector.onnx"
    _torch_export(DB(), (torch.randn(1, 3, 64, 96),), path, opset=11, names_in=["x"], names_out=["maps"],
                  dynamic={"x": {0: "N", 2: "H", 3: "W"}, "maps": {0: "N", 2: "H", 3: "W"}})
    _to_constants(path)


def _to_constants(path: Path) -> None:
    """Every initializer of the model at `path` becomes a Constant node (in place)."""
    import onnx

    model = onnx.load(path)
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def bert_tiny(folder: Path) -> None:
    """A sentence-embedding BERT's shape: token/position/type embeddings (Gather), attention mask, LayerNorm,
    GELU, mean pooling; opset 14, opset 11, fp16, and the dynamo exporter."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x, bias):
            n, t, d = x.shape
            q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, -1)
            x = self.ln1(x + self.o((a @ v).transpose(1, 2).reshape(n, t, d)))
            return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))

    class Bert(nn.Module):
        def __init__(self, vocab=3000, d=128, layers=2, heads=4):
            super().__init__()
            self.tok, self.pos, self.typ = nn.Embedding(vocab, d), nn.Embedding(128, d), nn.Embedding(2, d)
            self.ln = nn.LayerNorm(d)
            self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))

        def forward(self, input_ids, attention_mask, token_type_ids):
            t = input_ids.shape[1]
            x = self.ln(self.tok(input_ids) + self.pos(torch.arange(t).unsqueeze(0)) + self.typ(token_type_ids))
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            for layer in self.layers:
                x = layer(x, bias)
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp(min=1)

    torch.manual_seed(SEED)
    model = Bert()
    ids = torch.randint(0, 3000, (1, 16))
    args = (ids, torch.ones(1, 16, dtype=torch.int64), torch.zeros(1, 16, dtype=torch.int64))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "seq"} for n in names} | {"sentence_embedding": {0: "batch"}}
    for opset in (14, 11):
        _try(f"bert_tiny_op{opset}", lambda: _torch_export(model, args, folder / f"bert_tiny_op{opset}.onnx",
                                                           opset=opset, names_in=names, names_out=["sentence_embedding"],
                                                           dynamic=dynamic))
    _try("bert_tiny_fp16", lambda: _torch_export(_half(model), args,
                                                 folder / "bert_tiny_fp16.onnx", opset=14, names_in=names,
                                                 names_out=["sentence_embedding"], dynamic=dynamic))
    _try("bert_tiny_dynamo", lambda: _torch_export(model, args, folder / "bert_tiny_dynamo.onnx", opset=18,
                                                   names_in=names, names_out=["sentence_embedding"], dynamo=True))


def _half(model):
    import copy

    return copy.deepcopy(model).half()


# ---- tf2onnx -------------------------------------------------------------------------------------

def keras_conv1d(folder: Path) -> None:
    """A byte-sequence file-type classifier's shape: Embedding-free Conv1D stack on one-hot-ish floats, Dense,
    softmax; converted by tf2onnx at opsets 13 and 17 (run in a child process: tensorflow's threads)."""
    code = f"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf2onnx
tf.random.set_seed({SEED})
inp = tf.keras.Input((512, 1), name="bytes")
x = tf.keras.layers.Conv1D(32, 7, strides=2, activation="relu")(inp)
x = tf.keras.layers.MaxPooling1D(2)(x)
x = tf.keras.layers.Conv1D(64, 5, activation="relu")(x)
x = tf.keras.layers.GlobalAveragePooling1D()(x)
x = tf.keras.layers.Dense(128, activation="relu")(x)
x = tf.keras.layers.LayerNormalization()(x)
out = tf.keras.layers.Dense(40, activation="softmax", name="probs")(x)
model = tf.keras.Model(inp, out)
spec = (tf.TensorSpec((None, 512, 1), tf.float32, name="bytes"),)
for opset in (13, 17):
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset,
                               output_path=os.path.join({str(folder)!r}, f"keras_conv1d_op{{opset}}.onnx"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")


# ---- paddle2onnx ---------------------------------------------------------------------------------

def paddle_ocr_cls(folder: Path) -> None:
    """An OCR direction classifier's shape (depthwise separable convs, BatchNorm, hardswish, 2 classes),
    built in paddle and converted by paddle2onnx (child process)."""
    code = f"""
import os, tempfile
import paddle, paddle2onnx
from paddle import nn
paddle.seed({SEED})
def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2D(cin, cin, 3, stride, 1, groups=cin, bias_attr=False), nn.BatchNorm2D(cin),
                         nn.Hardswish(), nn.Conv2D(cin, cout, 1, bias_attr=False), nn.BatchNorm2D(cout), nn.Hardswish())
class Net(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 16, 3, 2, 1, bias_attr=False), nn.BatchNorm2D(16), nn.Hardswish())
        self.body = nn.Sequential(block(16, 32, 1), block(32, 64, 2), block(64, 128, 2))
        self.fc = nn.Linear(128, 2)
    def forward(self, x):
        f = self.body(self.stem(x)).mean([2, 3])
        return nn.functional.softmax(self.fc(f), -1)
net = Net()
net.eval()
with tempfile.TemporaryDirectory() as d:
    spec = [paddle.static.InputSpec([None, 3, 48, 192], "float32", "x")]
    paddle.jit.save(net, os.path.join(d, "inference"), input_spec=spec)
    files = os.listdir(d)
    model_file = next(os.path.join(d, f) for f in files if f.endswith((".pdmodel", ".json")))
    paddle2onnx.export(model_file, os.path.join(d, "inference.pdiparams"),
                       os.path.join({str(folder)!r}, "paddle_ocr_cls.onnx"), opset_version=11)
"""
    with tempfile.TemporaryDirectory() as d:  # paddle.jit reads the layer's source: a file, not -c
        script = Path(d) / "export_paddle.py"
        script.write_text(code)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")


FAMILIES = {"crnn": crnn, "db_detector": db_detector, "stream_gru_if": stream_gru_if, "paddle_style_constants": paddle_style_constants,
            "bert_tiny": bert_tiny, "keras_conv1d": keras_conv1d, "paddle_ocr_cls": paddle_ocr_cls}


def _try(name: str, make) -> bool:
    try:
        make()
        return True
    except ImportError as e:
        print(f"skipped {name}: {e} (install the exporter)", flush=True)
    except Exception as e:  # an exporter's own failure: report it, go on with the other families
        print(f"skipped {name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300],
              flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES))
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.only or FAMILIES:
        _try(name, lambda: FAMILIES[name](folder))
    for path in sorted(folder.glob("*.onnx")):
        print(f"{path.stat().st_size:>10}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
