"""The README's results table: every recipe on every sample, whole files, held-out test data.

    python benchmarks/results_table.py [--models lenet300 lenet5 ...] [--recipes share int8 ...]

Each recipe gets only the sample's calibration split (as `--data`) and is measured afterwards on
its test split, which no recipe sees: the searches (`deep-compression`, `auto`) measure their
budgets on the calibration data, which has no labels: the accuracy lost is estimated there with the
float model's own class probabilities as labels, on cross-fitted refits.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from onnxcompress import api
from onnxcompress.model import file_bytes

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DATA = {"lstm_rows": ("rows_calib.npz", "rows_test.npz")}
RUNS = [  # (label, recipe, budget)
    ("share", "share", None),
    ("share-4bit", "share-4bit", None),
    ("deep-compression", "deep-compression", None),
    ("deep-compression-fixed", "deep-compression-fixed", None),
    ("auto --max-drop 0.5", "auto", {"max_drop": 0.5}),
    ("auto --target-ratio 40", "auto", {"target_ratio": 40}),
    ("auto --target-ratio 39", "auto", {"target_ratio": 39}),
    ("int8", "int8", None),
    ("int4-weights", "int4-weights", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--recipes", nargs="+", help="labels of RUNS to keep (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            calib, test = DATA.get(model, ("mnist_calib.npz", "mnist_test.npz"))
            source = SAMPLES / f"{model}.onnx"
            for label, recipe, budget in RUNS:
                if args.recipes and label.split()[0] not in args.recipes and label not in args.recipes:
                    continue
                out = Path(tmp) / f"{model}.{recipe}.onnx"
                start = time.perf_counter()
                api.compress_file(source, out, recipe, data=SAMPLES / calib, budget=budget)
                seconds = time.perf_counter() - start
                validation = api.validate(source, out, SAMPLES / test)
                o = next(o for o in validation.outputs if o.accuracy_reference is not None)
                rows.append((model, label, file_bytes(source), file_bytes(out), o.accuracy_reference,
                             o.accuracy_candidate, o.top1_agreement, seconds))
                print(f"{model} {label}: {file_bytes(source) / file_bytes(out):.2f}x "
                      f"{100 * o.accuracy_reference:.1f}% -> {100 * o.accuracy_candidate:.1f}%", flush=True)
    print("\n| model | recipe | size | ratio | accuracy (float -> compressed) | top-1 agreement | time s |")
    print("|---|---|---|---|---|---|---|")
    for model, label, before, after, ref, cand, agree, seconds in rows:
        print(f"| {model} | `{label}` | {after / 1024:.1f} KB | {before / after:.1f}x | "
              f"{100 * ref:.1f}% -> {100 * cand:.1f}% | {100 * agree:.1f}% | {seconds:.0f} |")


if __name__ == "__main__":
    main()
