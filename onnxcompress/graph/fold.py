"""BatchNormalization folded into the convolution before it, so the pair quantizes as one QLinearConv.

Conv(x, W, b) -> BatchNormalization(gamma, beta, mean, var, eps) equals Conv(x, W', b') with

    k = gamma / sqrt(var + eps),   W'[m] = k[m] W[m],   b' = k (b - mean) + beta

(per output channel m). Only the pattern that is exactly that is folded: a Conv whose weight
(and bias) are float initializers used by nothing else, whose output feeds only the
BatchNormalization (inference mode, one output) and is not a graph output. Tensors whose data is
still on disk (streamed models) are left alone.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.graph.edit import NameScope, consumers

log = logging.getLogger(__name__)


def fold_batch_norms(model: onnx.ModelProto) -> list[str]:
    """Fold every foldable Conv -> BatchNormalization pair of the main graph in place; returns the BN names."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    outputs = {o.name for o in graph.output}
    scope = NameScope(model)
    folded, drop, freed = [], set(), set()
    for conv in list(graph.node):
        bn = _foldable_batch_norm(conv, inits, uses, outputs)
        if bn is None:
            continue
        _fold(graph, conv, bn, inits, scope)
        drop.add(conv.output[0])  # the BN is the one node reading the old Conv output
        freed.update(bn.input[1:5])
        conv.output[0] = bn.output[0]
        folded.append(bn.name or bn.output[0])
    if folded:
        keep = [n for n in graph.node if not (n.op_type == "BatchNormalization" and n.input[0] in drop)]
        del graph.node[:]
        graph.node.extend(keep)
        used = set(consumers(graph)) | {i.name for i in graph.input}  # subgraphs' outer-scope reads count
        stale = [t for t in graph.initializer if t.name in freed and t.name not in used]
        for t in stale:
            graph.initializer.remove(t)
        log.info("folded %d BatchNormalization nodes into their convolutions", len(folded))
    return folded


def _foldable_batch_norm(conv: onnx.NodeProto, inits: dict, uses: dict, outputs: set[str]) -> onnx.NodeProto | None:
    """The inference-mode BatchNormalization that alone reads `conv`'s output, when the Conv's weight and
    bias and the BN's parameters are in-memory initializers nothing else reads; else None."""
    if conv.op_type != "Conv" or len(conv.input) < 2 or conv.output[0] in outputs:
        return None
    follow = uses.get(conv.output[0], [])
    if len(follow) != 1 or follow[0][0].op_type != "BatchNormalization" or follow[0][1] != 0:
        return None
    bn = follow[0][0]
    params = [inits.get(n) for n in bn.input[1:5]]
    weight = inits.get(conv.input[1])
    bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    if any(t is not None and t.data_location == onnx.TensorProto.EXTERNAL
           for t in [*params, weight, inits.get(bias_name)]):
        return None
    if (len(bn.output) != 1 or any(p is None for p in params) or weight is None
            or len(uses.get(conv.input[1], [])) != 1 or (bias_name and (bias_name not in inits
                                                                         or len(uses.get(bias_name, [])) != 1))):
        return None
    if {a.name: helper.get_attribute_value(a) for a in bn.attribute}.get("training_mode", 0):
        return None
    return bn


def _fold(graph: onnx.GraphProto, conv: onnx.NodeProto, bn: onnx.NodeProto, inits: dict, scope: NameScope) -> None:
    """Scale the Conv's weight by gamma / sqrt(var + eps) per output channel and give it the bias
    k * (b - mean) + beta (a new initializer when the Conv had none)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
    params = [inits.get(n) for n in bn.input[1:5]]
    weight = inits[conv.input[1]]
    bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    gamma, beta, mean, var = (numpy_helper.to_array(p).astype(np.float64) for p in params)
    w = numpy_helper.to_array(weight)
    b = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros(w.shape[0])
    k = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    new_w = (w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    new_b = (k * (b - mean) + beta).astype(w.dtype)
    weight.CopyFrom(numpy_helper.from_array(new_w, weight.name))
    if bias_name:
        inits[bias_name].CopyFrom(numpy_helper.from_array(new_b, bias_name))
    else:
        bias_name = scope.fresh(f"{conv.name or 'conv'}_bias")
        graph.initializer.append(numpy_helper.from_array(new_b, bias_name))
        conv.input.append(bias_name)
