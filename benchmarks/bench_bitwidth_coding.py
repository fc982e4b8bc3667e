"""The bit-width search's predicted sweep, coding only: every candidate of some weights coded, priced and given its
layer error as `passes/bitwidth.py` (_predicted) does, no model run. For timing one tree against another as whole
processes (the same command with another tree on PYTHONPATH), e.g.

    python benchmarks/bench_bitwidth_coding.py model.onnx data.npz --weights 6 8 13

prints the weights, the candidates coded and the CPU seconds of the coding alone (the layer statistics excluded).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from onnxcompress.formats.forms import Form
from onnxcompress.graph.data import load_data, model_inputs
from onnxcompress.graph.model import load_model
from onnxcompress.graph.weights import find_weights, get_array
from onnxcompress.passes import bitpredict
from onnxcompress.passes.bitprune import predicted_candidate, Pruner
from onnxcompress.passes.bitsearch import predicted_bytes
from onnxcompress.passes.bitwidth import BitWidthConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--weights", nargs="+", type=int, required=True, help="indices among the searched weights")
    args = parser.parse_args()
    model = load_model(args.model)
    weights = [w for w in find_weights(model, min_elements=256) if w.skip is None]
    picked = [weights[i] for i in args.weights]
    data = load_data(args.data, specs=model_inputs(model))
    pruner = Pruner(model, data, picked)
    pruner.held_out_ridge = False
    cfg = BitWidthConfig(max_drop=1.0)
    grid = [(s, b) for s in sorted(cfg.sparsities) for b in sorted(cfg.bits, reverse=True)]
    start, count, total = time.process_time(), 0, 0.0
    for info in picked:
        array = get_array(model, info)
        layer, stats = pruner.layers.get(info.name), pruner.stats.get(info.name)
        rows = bitpredict.channel_rows(layer.out_channels) if stats is not None else None
        sample = bitpredict.row_sample(array) if stats is None else None
        error = bitpredict.LayerError(array if sample is None else sample, layer, stats, rows)
        for sparsity, bits in grid if len(info.shape) >= 2 else grid[:1]:
            coded = predicted_candidate(array, info, sparsity, bits, cfg.seed, pruner, rows=rows, sample=sample)
            total += predicted_bytes(coded, Form.PACKED) + error(coded.decode())
            count += 1
    print(f"{[w.name for w in picked]}: {count} candidates coded in {time.process_time() - start:.2f} CPU s "
          f"(checksum {total:.6g})")


if __name__ == "__main__":
    main()
