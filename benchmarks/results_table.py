"""The README's results table: every recipe on every sample, whole files, held-out test data.

    python benchmarks/results_table.py [--models lenet300 lenet5 ...] [--recipes share int8 ...]
                                       [--opsets 13 17 21]

Each recipe gets only the sample's calibration split (as `--data`) and is measured afterwards on
its test split, which no recipe sees: the searches (`deep-compression`, `auto`) measure their
budgets on the calibration data, which has no labels: the accuracy lost is estimated there with the
float model's own class probabilities as labels, on cross-fitted refits.

Sizes are what ships: the whole file on disk, gzip -9 and brotli -q 11 (when the `brotli` package is
installed) of it, and the float bytes resident once onnxruntime has folded the weights; ratios are
against the original file on disk. `--opsets` re-declares each sample at lower opsets first, as
exporters write them (:func:`at_opset`: every op of the samples has the same meaning at opsets
13-21, which the conversion checks by running both on the calibration data).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxcompress import api
from onnxcompress.graph.data import load_data
from onnxcompress.graph.model import file_bytes
from onnxcompress.recipes import load_recipe
from onnxcompress.runtime.sessions import make_session, run
from onnxcompress.runtime.shipped import shipped_size

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DATA = {"lstm_rows": ("rows_calib.npz", "rows_test.npz")}


def share_bits(bits: int):
    return load_recipe("share-4bit").with_options("share", bits_conv=bits, bits_fc=bits, bits_other=bits)


RUNS = [  # (label, recipe name or Recipe, budget)
    ("share", "share", None),
    ("share-4bit", "share-4bit", None),
    ("share-4bit, 3 bits", share_bits(3), None),
    ("share-4bit, 2 bits", share_bits(2), None),
    ("deep-compression-portable", "deep-compression-portable", None),
    ("deep-compression", "deep-compression", None),
    ("deep-compression-fixed", "deep-compression-fixed", None),
    ("auto --max-drop 0.5", "auto", {"max_drop": 0.5}),
    ("auto --target-ratio 40", "auto", {"target_ratio": 40}),
    ("auto --target-ratio 39", "auto", {"target_ratio": 39}),
    ("int8", "int8", None),
    ("int4-weights", "int4-weights", None),
]
PORTABLE_ONLY = {"share", "share-4bit", "deep-compression-portable"}  # runs repeated at every --opsets


def at_opset(source: Path, opset: int, folder: Path, data: Path) -> Path:
    """The sample re-declared at `opset` (IR 8), checked by onnx and by equal outputs in onnxruntime.

    onnx's version converter cannot go down from Relu-14; every op in the samples (Gemm, Conv, Relu,
    MaxPool, Flatten, BatchNormalization, GlobalAveragePool, Add, LSTM, Transpose, Squeeze) reads the
    same at opsets 13-21, so the declaration is what changes, and the outputs prove it."""
    model = onnx.load(str(source))
    if opset == model.opset_import[0].version:
        return source
    model.opset_import[0].version, model.ir_version = opset, 8
    onnx.checker.check_model(model, full_check=True)
    path = folder / f"{source.stem}.opset{opset}.onnx"
    onnx.save(model, str(path))
    dataset = load_data(data)
    before = run(make_session(source), dataset, onnx.load(str(source)))
    after = run(make_session(path), dataset, model)
    if not all(np.array_equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y)):
        raise SystemExit(f"{source.name} at opset {opset} does not compute the same outputs")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--recipes", nargs="+", help="labels of RUNS to keep (default: all)")
    parser.add_argument("--opsets", nargs="+", type=int, default=[21],
                        help="opsets to declare the samples at; recipes other than the portable ones run at the "
                             "samples' own opset (21) only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(HEADER, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            calib, test = DATA.get(model, ("mnist_calib.npz", "mnist_test.npz"))
            original = SAMPLES / f"{model}.onnx"
            for opset in args.opsets:
                source = at_opset(original, opset, Path(tmp), SAMPLES / calib)
                for label, recipe, budget in RUNS:
                    if args.recipes and label.split()[0].rstrip(",") not in args.recipes and label not in args.recipes:
                        continue
                    if opset != 21 and label.split()[0].rstrip(",") not in PORTABLE_ONLY:
                        continue
                    out = Path(tmp) / f"{model}.{opset}.{len(rows)}.onnx"
                    start = time.perf_counter()
                    api.compress_file(source, out, recipe, data=SAMPLES / calib, budget=budget)
                    seconds = time.perf_counter() - start
                    validation = api.validate(source, out, SAMPLES / test)
                    o = next(o for o in validation.outputs if o.accuracy_reference is not None)
                    shipped = shipped_size(out)
                    rows.append(row(model, opset, label, file_bytes(source), shipped, o.accuracy_reference,
                                    o.accuracy_candidate, o.top1_agreement, seconds))
                    print(rows[-1], flush=True)
    print("\n" + HEADER)
    print("\n".join(rows))


HEADER = ("| model | opset | recipe | size | ratio | gzip -9 | brotli -q 11 | resident | accuracy (float -> compressed) "
          "| top-1 agreement | time s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def row(model, opset, label, before, shipped, ref, cand, agree, seconds) -> str:
    brotli = f"{shipped.brotli / 1024:.1f} KB ({before / shipped.brotli:.1f}x)" if shipped.brotli else "-"
    resident = f"{shipped.resident / 1024:.0f} KB" if shipped.resident is not None else "-"
    return (f"| {model} | {opset} | `{label}` | {shipped.disk / 1024:.1f} KB | {before / shipped.disk:.1f}x | "
            f"{shipped.gzip / 1024:.1f} KB ({before / shipped.gzip:.1f}x) | {brotli} | {resident} | "
            f"{100 * ref:.1f}% -> {100 * cand:.1f}% | {100 * agree:.1f}% | {seconds:.0f} |")


if __name__ == "__main__":
    main()
