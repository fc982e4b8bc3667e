"""Static int8 quantization: onnxcompress (calibrate + qdq) against onnxruntime.quantization.quantize_static.

Same models, same calibration data (the same batches of 50 through a CalibrationDataReader),
QDQ format, uint8 activations, int8 per-channel weights, MinMax, Entropy and Percentile
(99.999) calibrators; the `int8` recipe uses percentile.

Measured:
- accuracy on samples/mnist_test.npz (1000 labelled digits) and whole-file size;
- calibration wall time and peak memory, each in a fresh subprocess: the peak RSS (VmHWM,
  reset through /proc/self/clear_refs once the model and data are loaded) minus the RSS at
  that point, so only calibration counts; onnxcompress and onnxruntime runs alternate;
  onnxcompress: `calibrate(...)`; onnxruntime: `create_calibrator` + `collect_data` +
  `compute_data`, exactly what quantize_static runs;
- the same at 10x the samples (the 500 calibration digits tiled with random 2-pixel shifts);
- inference latency of the float model and both int8 models in one process, interleaved rounds,
  median per call, batch 1 and batch 64, one intra-op thread.

    python benchmarks/bench_quantization.py                 # lenet5, lenet300, resnet_bn (if present)
    python benchmarks/bench_quantization.py --models lenet5 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
BATCH = 50  # divides 500 and 5000: onnxruntime's histogram calibrators fail on a smaller last batch


def calibration_data(scale: int) -> np.ndarray:
    x = np.load(SAMPLES / "mnist_calib.npz")["input"]
    if scale == 1:
        return x
    rng = np.random.default_rng(0)
    out = np.empty((x.shape[0] * scale,) + x.shape[1:], dtype=x.dtype)
    out[: x.shape[0]] = x
    for k in range(1, scale):
        dy, dx = rng.integers(-2, 3, size=2)
        out[k * x.shape[0]:(k + 1) * x.shape[0]] = np.roll(x, (int(dy), int(dx)), axis=(2, 3))
    return out


def make_reader(x: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(x):
                return None
            batch = {"input": x[self.start:self.start + BATCH]}
            self.start += BATCH
            return batch

        def rewind(self):
            self.start = 0

    return Reader()


# -- one measurement per fresh process ------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> int:
    """Reset the peak-RSS mark (VmHWM) to the current RSS; returns that baseline in KB.

    getrusage's ru_maxrss is useless here: Linux carries the parent's peak across fork + exec.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def worker(spec: dict) -> dict:
    x = calibration_data(spec["scale"])
    path = SAMPLES / f"{spec['model']}.onnx"
    if spec["tool"] == "ours":
        import onnx

        from onnxcompress.graph.data import Dataset
        from onnxcompress.passes.calibrate import CalibrateConfig, calibrate

        model = onnx.load(str(path))
        data = Dataset(stacked={"input": x})
        base = reset_peak()
        start = time.perf_counter()
        result = calibrate(model, data, CalibrateConfig(method=spec["method"], max_batch=BATCH))
        seconds = time.perf_counter() - start
        tensors = len(result.ranges)
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[spec["method"]]
        reader = make_reader(x)
        base = reset_peak()
        with tempfile.TemporaryDirectory(prefix="bench-ort-") as folder:
            start = time.perf_counter()
            calibrator = create_calibrator(path, ops, augmented_model_path=str(Path(folder) / "augmented.onnx"),
                                           calibrate_method=method)
            calibrator.collect_data(reader)
            result = calibrator.compute_data()
            seconds = time.perf_counter() - start
        tensors = len(result.data)
    peak = _status_kb("VmHWM")
    return {"seconds": seconds, "peak_mb": (peak - base) / 1024, "base_mb": base / 1024, "tensors": tensors}


def run_worker(spec: dict, attempts: int = 3) -> dict:
    for attempt in range(attempts):
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
        if attempt + 1 < attempts:
            time.sleep(15)  # a shared checkout may be mid-edit: retry before giving up
    raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")


def measure_pair(ours: dict, theirs: dict, repeat: int) -> tuple[dict, dict]:
    """Median time and max peak memory over `repeat` fresh processes each, the two tools alternating."""
    runs = {"ours": [], "theirs": []}
    for _ in range(repeat):
        runs["ours"].append(run_worker(ours))
        runs["theirs"].append(run_worker(theirs))
    return tuple({"seconds": float(np.median([r["seconds"] for r in rs])), "peak_mb": max(r["peak_mb"] for r in rs),
                  "tensors": rs[0]["tensors"]} for rs in (runs["ours"], runs["theirs"]))


# -- models ----------------------------------------------------------------------------------------
def quantize_ours(name: str, method: str, folder: Path, recipe_steps=None) -> tuple[Path, float]:
    from onnxcompress.api import compress
    from onnxcompress.graph.data import Dataset
    from onnxcompress.graph.model import save_model
    from onnxcompress.recipes import Recipe

    steps = recipe_steps or [("calibrate", {"method": method}), ("qdq", {})]
    start = time.perf_counter()
    model, report = compress(SAMPLES / f"{name}.onnx", Recipe("bench", steps),
                             Dataset(stacked={"input": calibration_data(1)}), validate="none")
    seconds = time.perf_counter() - start
    out = folder / f"{name}-ours-{method}.onnx"
    save_model(model, out)
    return out, seconds, report


def quantize_ort(name: str, method: str, folder: Path) -> tuple[Path, float]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = folder / f"{name}-ort-{method}.onnx"
    start = time.perf_counter()
    quantize_static(str(SAMPLES / f"{name}.onnx"), str(out), make_reader(calibration_data(1)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[method])
    return out, time.perf_counter() - start


def session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy(path: Path) -> float:
    test = np.load(SAMPLES / "mnist_test.npz")
    s = session(path, threads=2)
    pred = np.concatenate([s.run(None, {"input": test["input"][i:i + 250]})[0].argmax(-1)
                           for i in range(0, len(test["input"]), 250)])
    return 100.0 * float(np.mean(pred == test["labels"]))


def latencies(paths: dict[str, Path], rounds: int, batch: int, calls: int = 40) -> dict[str, float]:
    """Median seconds per call, models interleaved round by round."""
    x = np.load(SAMPLES / "mnist_test.npz")["input"][:batch]
    sessions = {k: session(p) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, {"input": x})
    times = {k: [] for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = []
            for _ in range(calls):
                start = time.perf_counter()
                s.run(None, {"input": x})
                t.append(time.perf_counter() - start)
            times[k].append(float(np.median(t)))
    return {k: float(np.median(v)) for k, v in times.items()}


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet300", "resnet_bn", "dwsep_bnfold"])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per calibration measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--scale", type=int, default=10, help="sample multiplier of the flat-memory row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    models = [m for m in args.models if (SAMPLES / f"{m}.onnx").exists()]
    skipped = sorted(set(args.models) - set(models))
    methods = ["minmax", "entropy", "percentile"]
    quality, calib, latency_rows, other = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        folder = Path(tmp)
        for name in models:
            float_path = SAMPLES / f"{name}.onnx"
            float_acc = accuracy(float_path)
            quality.append([name, "float", "-", f"{float_acc:.2f}", f"{float_path.stat().st_size / 1024:.1f}", "-"])
            paths = {"float": float_path}
            ours, ours_s, _ = quantize_ours(name, "mse", folder)  # the int8 recipe's calibrator; onnxruntime has none
            quality.append([name, "onnxcompress (int8 recipe)", "mse", f"{accuracy(ours):.2f}",
                            f"{ours.stat().st_size / 1024:.1f}", f"{ours_s:.2f}"])
            paths["ours-mse"] = ours
            for scale in (1, args.scale):
                rs = [run_worker({"tool": "ours", "model": name, "method": "mse", "scale": scale})
                      for _ in range(args.repeat)]
                a = {"seconds": float(np.median([r["seconds"] for r in rs])), "peak_mb": max(r["peak_mb"] for r in rs),
                     "tensors": rs[0]["tensors"]}
                calib.append([name, "mse (ours only)", 500 * scale, f"{a['seconds']:.2f}", "-", "-",
                              f"{a['peak_mb']:.1f}", "-", f"{a['tensors']}/-"])
            for method in methods:
                ours, ours_s, _ = quantize_ours(name, method, folder)
                theirs, theirs_s = quantize_ort(name, method, folder)
                for tool, path, secs in (("onnxcompress", ours, ours_s), ("quantize_static", theirs, theirs_s)):
                    quality.append([name, tool, method, f"{accuracy(path):.2f}", f"{path.stat().st_size / 1024:.1f}",
                                    f"{secs:.2f}"])
                paths[f"ours-{method}"], paths[f"ort-{method}"] = ours, theirs
                for scale in (1, args.scale):
                    a, b = measure_pair({"tool": "ours", "model": name, "method": method, "scale": scale},
                                        {"tool": "ort", "model": name, "method": method, "scale": scale}, args.repeat)
                    n = 500 * scale
                    calib.append([name, method, n, f"{a['seconds']:.2f}", f"{b['seconds']:.2f}",
                                  f"{a['seconds'] / b['seconds']:.2f}", f"{a['peak_mb']:.1f}", f"{b['peak_mb']:.1f}",
                                  f"{a['tensors']}/{b['tensors']}"])
                    print(f"  {name} {method} x{scale}: ours {a}, ort {b}", file=sys.stderr, flush=True)
            for steps, label in (([("qdq", {"mode": "weights"})], "int8-weights"),
                                 ([("qdq", {"mode": "weights", "int4_matmul": True})], "int4-weights")):
                path, secs, _ = quantize_ours(name, label, folder, steps)
                other.append([name, label, f"{accuracy(path):.2f}", f"{path.stat().st_size / 1024:.1f}"])
            for batch in (1, 64):
                keys = ["float"] + [f"{t}-{m}" for m in methods for t in ("ours", "ort")] + ["ours-mse"]
                lat = latencies({k: paths[k] for k in keys}, args.rounds, batch, calls=400 if batch == 1 else 40)
                latency_rows.append([name, batch, f"{1e3 * lat['float']:.3f}", f"{1e3 * lat['ours-minmax']:.3f}",
                                     f"{1e3 * lat['ort-minmax']:.3f}"]
                                    + [f"{lat[f'ours-{m}'] / lat[f'ort-{m}']:.3f}" for m in methods]
                                    + [f"{lat['ours-mse'] / lat['float']:.3f}"])
    print("\n### Accuracy (mnist_test, 1000 digits) and whole-file size\n")
    print(table(["model", "tool", "calibrator", "top-1 %", "file KB", "end-to-end s"], quality))
    print("\n### Calibration only: median wall time of %d fresh processes, peak memory above the loaded baseline\n"
          % args.repeat)
    print(table(["model", "calibrator", "samples", "ours s", "ORT s", "time ratio", "ours peak MB", "ORT peak MB",
                 "tensors ours/ORT"], calib))
    print("\n### Inference latency (onnxruntime, 1 thread, median ms per call, %d interleaved rounds)\n" % args.rounds)
    print(table(["model", "batch", "float ms", "ours minmax ms", "ORT minmax ms", "ours/ORT minmax",
                 "ours/ORT entropy", "ours/ORT percentile", "ours int8 recipe/float"], latency_rows))
    print("\n### Weight-only recipes (onnxcompress)\n")
    print(table(["model", "recipe", "top-1 %", "file KB"], other))
    if skipped:
        print(f"\n(skipped, not in samples/: {', '.join(skipped)})")


if __name__ == "__main__":
    main()
