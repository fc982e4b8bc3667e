"""The `int8` recipe (static int8 with its fidelity guard) side by side with onnxruntime's
quantize_dynamic and quantize_static (QDQ, MinMax, per-channel int8 weights, uint8 activations) on
the same model and the same calibration data: whole-file size ratio and top-1 agreement with the
float model on the held-out split, and the guard's decision (what stayed float, any fallback).

    python benchmarks/bench_int8_guard.py                       # lenet5, resnet_bn, dwsep_bnfold, lstm_rows
    python benchmarks/bench_int8_guard.py --models lenet5
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
MODELS = {"lenet5": "mnist", "resnet_bn": "mnist", "dwsep_bnfold": "mnist", "lstm_rows": "rows"}


def agreement(reference: onnx.ModelProto, candidate: onnx.ModelProto, x: np.ndarray) -> float:
    from onnxcompress.graph.data import Dataset
    from onnxcompress.runtime.metrics import compare_models

    return compare_models(reference, candidate, Dataset(stacked={"input": x})).outputs[0].top1_agreement


def ort_static(source: Path, target: Path, x: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[k:k + 50]} for k in range(0, len(x), 50)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxcompress.api import compress_file

    print("| model | tool | size ratio | top-1 agreement (held out) | seconds | guard |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        source = SAMPLES / f"{name}.onnx"
        calib = np.load(SAMPLES / f"{MODELS[name]}_calib.npz")["input"]
        test = np.load(SAMPLES / f"{MODELS[name]}_test.npz")["input"]
        model = onnx.load(str(source))
        with tempfile.TemporaryDirectory(prefix="bench-int8-") as folder:
            rows = []
            start = time.perf_counter()
            report = compress_file(source, Path(folder) / "ours.onnx", "int8", data=SAMPLES / f"{MODELS[name]}_calib.npz")
            rows.append(("onnxcompress int8", Path(folder) / "ours.onnx", time.perf_counter() - start,
                         "; ".join(n[:90] for n in report.notes if "kept float to hold" in n or "missed" in n) or "-"))
            start = time.perf_counter()
            quantize_dynamic(source, Path(folder) / "dyn.onnx", weight_type=QuantType.QInt8)
            rows.append(("ort quantize_dynamic", Path(folder) / "dyn.onnx", time.perf_counter() - start, ""))
            start = time.perf_counter()
            ort_static(source, Path(folder) / "static.onnx", calib)
            rows.append(("ort quantize_static", Path(folder) / "static.onnx", time.perf_counter() - start, ""))
            for tool, path, seconds, guard in rows:
                ratio = source.stat().st_size / path.stat().st_size
                agree = agreement(model, onnx.load(str(path)), test)
                print(f"| {name} | {tool} | {ratio:.2f}x | {agree:.4f} | {seconds:.1f} | {guard} |", flush=True)


if __name__ == "__main__":
    main()
