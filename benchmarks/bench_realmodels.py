"""Every recipe on every real-model corpus model (benchmarks/realmodels), against onnxruntime's quantizers.

    python benchmarks/bench_realmodels.py [--models lac orinet ...] [--recipes share int8 ...]
        [--timeout 900] [--out results/realmodels] [--metric KIND...] [--no-data]

Each recipe gets the model's calibration split as --data and its task kind as --metric; the result
is judged on the test split, which no recipe sees, by the model's own task (realmodels/<model>.py).
Columns: whole-file ratio on disk; ratio of the original file to the output after gzip -9; task
agreement on the test split; latency of the output over the original's (median of interleaved
runs of the same feeds, same process); wall time of the compression and the slowest passes.
Anchors: onnxruntime.quantization's quantize_dynamic (QInt8 weights) and quantize_static (QDQ,
per-channel, MinMax over the calibration split). --no-data: the recipes as users often run them,
without --data (the anchors still calibrate). Each (model, recipe) runs in its own process with a
time limit; a failure is a row with its one line, never a crash of the runner.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import realmodels as rm  # noqa: E402

RUNS = {  # label -> (recipe, extra budget)
    "share": ("share", None),
    "share-4bit": ("share-4bit", None),
    "int8": ("int8", None),
    "int8-weights": ("int8-weights", None),
    "int8-dynamic": ("int8-dynamic", None),
    "deep-compression": ("deep-compression", None),
    "auto --max-drop 1 (portable)": ("auto", {"max_drop": 1.0}),
    "ort quantize_dynamic": ("ort-dynamic", None),
    "ort quantize_static": ("ort-static", None),
}


def _gzip_bytes(path: Path) -> int:
    from onnxcompress.graph.model import external_data_files

    import onnx

    blobs = [path.read_bytes()]
    for location in external_data_files(onnx.load(str(path), load_external_data=False)):
        blobs.append((path.parent / location).read_bytes())
    return sum(len(gzip.compress(b, compresslevel=9)) for b in blobs)


def _ort_quantize(kind: str, source: Path, out: Path, calib: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name("pre.onnx")
    try:
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - the anchor as a user runs it: without pre-processing if it fails
        pre = source
    if kind == "ort-dynamic":
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
        return

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the machine is shared: wall time is not ours)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def _latency(reference: Path, candidate: Path, feeds: list[dict]) -> float:
    ref, cand = rm.runner(reference), rm.runner(candidate)
    times = {0: [], 1: []}
    for _ in range(3):
        for which, run in ((0, ref), (1, cand)):
            start = time.perf_counter()
            for feed in feeds:
                run(feed)
            times[which].append(time.perf_counter() - start)
    return float(np.median(times[1]) / np.median(times[0]))


def _shown(label: str, data: bool) -> str:
    """A row's recipe column: the run's label, marked when the recipe ran without the calibration split."""
    return label if data else f"{label} (no data)"


def run_one(name: str, label: str, metric: str | None = None, data: bool = True) -> dict:
    """One (model, recipe) cell, in this process; `metric` in place of the model's own METRIC (an experiment);
    without `data` the recipe gets no calibration split."""
    from onnxcompress import api
    from onnxcompress.graph.model import file_bytes

    module = rm.load(name)
    source = module.model_path()
    sizes = getattr(module, "SIZES", rm.SPLITS)
    calib, _ = rm.split(module, "calibration", sizes["calibration"])
    _, items = rm.split(module, "test", sizes["test"])
    recipe, budget = RUNS[label]
    row = {"model": name, "recipe": _shown(label, data)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        start, cpu = time.perf_counter(), _cpu_seconds()
        if recipe.startswith("ort-"):
            _ort_quantize(recipe, source, out, calib)
        else:
            form = "portable" if label.endswith("(portable)") else None
            report = api.compress_file(source, out, recipe, data=calib if data else None, form=form,
                                       budget={"metric": metric or module.METRIC, **(budget or {})}, jobs=2)
            row["passes"] = {p.name: round(p.seconds, 1) for p in report.passes}
            searched = next((p.summary.get("candidates") for p in report.passes if p.name == "bitwidth"), None)
            if searched:  # the bit-width search's candidates measured, predicted only, verified jointly
                row["candidates"] = searched
            if report.validation is not None:
                row["tool_agreement"] = report.validation.worst_agreement()
                row["tool_task"] = [o.task for o in report.validation.outputs if o.budgeted]
        row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, _cpu_seconds() - cpu
        before, after = file_bytes(source), file_bytes(out)
        row.update(bytes=after, ratio=before / after, gzip_ratio=before / _gzip_bytes(out))
        row["agreement"] = rm.agreement(module, source, out, items)
        lat_feeds = (items if not hasattr(module, "stream") else calib)[:20]
        row["latency_ratio"] = _latency(source, out, lat_feeds)
    return row


def _cell(name: str, label: str, timeout: float, metric: str | None = None, data: bool = True) -> dict:
    import os
    import signal

    cmd = [sys.executable, __file__, "--one", name, label] + (["--metric", metric] if metric else []) + \
        ([] if data else ["--no-data"])
    label = _shown(label, data)
    # its own process group, so that a timeout also ends the workers the compression started
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"model": name, "recipe": label, "error": f"did not finish in {timeout:.0f} s (wall, shared machine)"}
    done = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in (done.stderr or "").strip().splitlines() if line.strip()]
    return {"model": name, "recipe": label, "error": tail[-1][:300] if tail else f"exit {done.returncode}"}


def _markdown(rows: list[dict]) -> str:
    head = "| model | recipe | ratio | gzip -9 ratio | task agreement | latency x | wall s | CPU s | slowest passes (wall s) |\n" \
           "|---|---|---|---|---|---|---|---|---|\n"
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['model']} | {r['recipe']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        slow = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.get("passes", {}).items(), key=lambda kv: -kv[1])[:2])
        body.append(f"| {r['model']} | {r['recipe']} | {r['ratio']:.2f}x | {r['gzip_ratio']:.2f}x | "
                    f"{100 * r['agreement']:.1f}% | {r['latency_ratio']:.2f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {slow} |")
    return head + "\n".join(body) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(rm.MODELS))
    parser.add_argument("--recipes", nargs="*", default=list(RUNS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per (model, recipe)")
    parser.add_argument("--out", default=str(HERE / "results" / "realmodels"))
    parser.add_argument("--metric", help="the task kind given to every recipe instead of each model's METRIC")
    parser.add_argument("--no-data", action="store_true", help="compress without the calibration split")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, metric=args.metric, data=not args.no_data)))
        return 0
    rows = []
    for name in args.models:
        try:
            rm.load(name).model_path()
        except rm.Unavailable as e:
            rows.append({"model": name, "recipe": "-", "error": f"not available: {e}"})
            continue
        for label in args.recipes:
            row = _cell(name, label, args.timeout, args.metric, data=not args.no_data)
            rows.append(row)
            print(_markdown([row]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(_markdown(rows))
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
