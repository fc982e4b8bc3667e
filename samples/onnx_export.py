"""Export the numpy models of ``nn.py`` to ONNX (opset 21, IR 10), the way PyTorch would.

Initializers are named ``<layer>.<param>`` (``conv1.weight``, ``bn1.running_mean``);
nodes are named after their layer. ``fold_bn=True`` folds each BatchNorm that directly
follows a Conv into that Conv's weight and bias, as exporters do in eval mode.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import nn

OPSET, IR_VERSION = 21, 10


class GraphBuilder:
    """Accumulates nodes and initializers; every node output is ``<node name>_out``."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, name, **attrs):
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def model(self, in_shape, out_shape, doc):
        """Close the graph: name the last output ``logits`` and wrap it in a ModelProto."""
        last = self.nodes[-1]
        last.output[0] = "logits"
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", *out_shape])
        graph = helper.make_graph(self.nodes, "main", [inp], [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="onnxcompress-samples",
                                  doc_string=doc)
        onnx.checker.check_model(model, full_check=True)
        return model


def fold_batchnorm(conv, bn):
    """Return (weight, bias) of ``conv`` with the following eval-mode ``bn`` folded in."""
    scale = bn.params["weight"] / np.sqrt(bn.buffers["running_var"] + bn.eps)
    w = conv.params["weight"] * scale[:, None, None, None]
    b = (conv.params["bias"] - bn.buffers["running_mean"]) * scale + bn.params["bias"]
    return w.astype(np.float32), b.astype(np.float32)


def _conv(gb, x, name, layer, weight=None, bias=None):
    w = layer.params["weight"] if weight is None else weight
    b = layer.params["bias"] if bias is None else bias
    p, k = layer.pad, layer.k
    return gb.node("Conv", [x, gb.init(f"{name}.weight", w), gb.init(f"{name}.bias", b)], name,
                   kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[p] * 4,
                   group=layer.groups, dilations=[1, 1])


def _batchnorm(gb, x, name, layer):
    ins = [x] + [gb.init(f"{name}.{k}", layer.params[k]) for k in ("weight", "bias")]
    ins += [gb.init(f"{name}.{k}", layer.buffers[k]) for k in ("running_mean", "running_var")]
    return gb.node("BatchNormalization", ins, name, epsilon=layer.eps, momentum=1 - layer.momentum)


def _dense(gb, x, name, layer):
    return gb.node("Gemm", [x, gb.init(f"{name}.weight", layer.params["weight"]),
                            gb.init(f"{name}.bias", layer.params["bias"])], name, transB=1)


def _lstm(gb, x, name, layer):
    """[N, T, F] -> Transpose -> LSTM -> Y_h [1, N, H] -> Squeeze -> [N, H]."""
    p, h = layer.params, layer.hidden
    xt = gb.node("Transpose", [x], f"{name}.transpose", perm=[1, 0, 2])
    ins = [xt, gb.init(f"{name}.W", p["W"][None]), gb.init(f"{name}.R", p["R"][None]),
           gb.init(f"{name}.B", np.concatenate([p["Wb"], p["Rb"]])[None])]
    y_h = f"{name}_Y_h"
    gb.nodes.append(helper.make_node("LSTM", ins, ["", y_h], name=name, hidden_size=h,
                                     direction="forward"))
    axes = gb.init(f"{name}.squeeze_axes", np.array([0], np.int64))
    return gb.node("Squeeze", [y_h, axes], f"{name}.squeeze")


_SIMPLE = {nn.Relu: ("Relu", {}), nn.Flatten: ("Flatten", {"axis": 1}),
           nn.GlobalAvgPool: ("GlobalAveragePool", {}),
           nn.MaxPool2: ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})}


def emit(gb, x, seq, prefix="", fold_bn=False):
    """Emit the layers of Sequential ``seq`` on input tensor ``x``; return the output name."""
    layers = seq.layers
    i = 0
    while i < len(layers):
        name, layer = layers[i]
        full = prefix + name
        nxt = layers[i + 1][1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.Residual):
            body = emit(gb, x, layer, full + ".", fold_bn)
            x = gb.node("Add", [body, x], f"{full}.add")
        elif isinstance(layer, nn.Sequential):
            x = emit(gb, x, layer, full + ".", fold_bn)
        elif isinstance(layer, nn.Conv2d) and fold_bn and isinstance(nxt, nn.BatchNorm2d):
            x = _conv(gb, x, full, layer, *fold_batchnorm(layer, nxt))
            i += 1
        elif isinstance(layer, nn.Conv2d):
            x = _conv(gb, x, full, layer)
        elif isinstance(layer, nn.BatchNorm2d):
            x = _batchnorm(gb, x, full, layer)
        elif isinstance(layer, nn.Dense):
            x = _dense(gb, x, full, layer)
        elif isinstance(layer, nn.LSTM):
            x = _lstm(gb, x, full, layer)
        else:
            op, attrs = _SIMPLE[type(layer)]
            x = gb.node(op, [x], full, **attrs)
        i += 1
    return x


def export(seq, in_shape, n_classes, doc, fold_bn=False):
    """Build the ONNX model of ``seq``: input ``input`` [batch, *in_shape], output ``logits``."""
    gb = GraphBuilder()
    emit(gb, "input", seq, fold_bn=fold_bn)
    return gb.model(in_shape, [n_classes], doc)
