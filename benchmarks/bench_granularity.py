"""Granularity of weight sharing on the sample models: per-tensor vs per-channel scales vs per-group
codebooks vs outliers kept apart vs the automatic per-layer choice, at several bit widths.

Every weight of at least `--min-elements` entries is shared at the same bit width (bits_conv =
bits_fc = bits_other), portable form, as the `share-4bit` recipe does at 4 bits. The fixed options
run without calibration data (plain k-means, nearest codes: the granularity alone); "auto" gets
the calibration split, so it measures each layer's output error, tries importance-weighted k-means
and GPTQ codes with least-squares centroids, codes each bias first, measured in its layer's output,
with its layer's weight cancelling that error, and the share pass's centroid refinement runs after
it, as in a user's default run. Any option leaves a weight float when its portable form would not
be smaller ("float" in the last column).

    python benchmarks/bench_granularity.py                 # all samples, 3/4/5 bits
    python benchmarks/bench_granularity.py --samples lenet300 --bits 4 --json out.json

Columns: whole-file ratio (original .onnx bytes / compressed .onnx bytes, both written to disk),
top-1 agreement with the float model and accuracy on the test split, compression time (seconds
spent in the passes, wall clock; the machine may be shared, so compare within a run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

from onnxcompress.api import compress
from onnxcompress.graph.model import file_bytes, save_model
from onnxcompress.recipes import Recipe

ROOT = Path(__file__).resolve().parent.parent / "samples"
SAMPLES = {  # model -> (calibration split, test split)
    "lenet300": ("mnist_calib.npz", "mnist_test.npz"),
    "lenet5": ("mnist_calib.npz", "mnist_test.npz"),
    "dwsep_bnfold": ("mnist_calib.npz", "mnist_test.npz"),
    "resnet_bn": ("mnist_calib.npz", "mnist_test.npz"),
    "lstm_rows": ("rows_calib.npz", "rows_test.npz"),
}
VARIANTS = {  # label -> (share options, use calibration data)
    "per-tensor": ({"granularity": "tensor"}, False),
    "per-channel scale": ({"granularity": "channel"}, False),
    "per-group (8 ch)": ({"granularity": "group", "group_size": 8}, False),
    "outlier 0.5%": ({"granularity": "outlier", "outlier_fraction": 0.005}, False),
    "auto (calibrated)": ({"granularity": "auto"}, True),
}


def run_one(sample: str, bits: int, options: dict, calibrated: bool, min_elements: int) -> dict:
    calib, test = (str(ROOT / f) for f in SAMPLES[sample])
    source = ROOT / f"{sample}.onnx"
    share = dict(bits_conv=bits, bits_fc=bits, bits_other=bits, min_elements=min_elements, **options)
    recipe = Recipe(f"share-{bits}bit", [("share", share)])
    start = time.perf_counter()
    model, report = compress(onnx.load(source), recipe, calib if calibrated else None, eval_data=test)
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.onnx")
        save_model(model, path)
        size = file_bytes(path)
    out = report.validation.outputs[0]
    chosen: dict[str, int] = {}
    for record in report.weights:
        label = record.details.get("granularity")
        if label:
            chosen[label] = chosen.get(label, 0) + 1
    return {"sample": sample, "bits": bits, "ratio": file_bytes(source) / size, "bytes": size,
            "agreement": out.top1_agreement, "accuracy": out.accuracy_candidate,
            "accuracy_float": out.accuracy_reference, "seconds": sum(p.seconds for p in report.passes),
            "wall_seconds": wall, "chosen": chosen}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=",".join(SAMPLES))
    parser.add_argument("--bits", default="3,4,5")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--min-elements", type=int, default=0, help="share every weight this large (0: all)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    samples = [s for s in args.samples.split(",") if s]
    missing = [s for s in samples if not (ROOT / f"{s}.onnx").exists()]
    if missing:
        print(f"missing samples {missing}: run samples/make_samples.py", file=sys.stderr)
        return 2
    rows = []
    print("| model | bits | option | file ratio | top-1 agreement | accuracy (float) | time s | chosen per layer |")
    print("|---|---|---|---|---|---|---|---|")
    for sample in samples:
        for bits in (int(b) for b in args.bits.split(",")):
            for label in args.variants.split(","):
                options, calibrated = VARIANTS[label]
                row = run_one(sample, bits, options, calibrated, args.min_elements)
                row["option"] = label
                rows.append(row)
                chosen = ", ".join(f"{k} x{v}" for k, v in sorted(row["chosen"].items()))
                print(f"| {sample} | {bits} | {label} | {row['ratio']:.2f}x | {100 * row['agreement']:.1f}% | "
                      f"{100 * row['accuracy']:.1f}% ({100 * row['accuracy_float']:.1f}%) | {row['seconds']:.1f} | "
                      f"{chosen} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
