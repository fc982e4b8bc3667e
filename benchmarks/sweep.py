"""Every recipe on every ONNX file found under the given folders: does anything crash?

    python benchmarks/sweep.py FOLDER_OR_FILE ... [--recipes share int8 ...] [--timeout 600]
                               [--max-mb 60] [--json out.json] [--data N]

Meant for models nobody here chose: point it at installed packages (site-packages) and it runs
the CLI, each model and recipe in its own process with synthesized data (the tool's own
`--data`-less path, where onnxcompress makes feeds from the model's input declarations), and
sorts the outcomes: ok (exit 0), refused (exit 2: one line naming the problem, the contract for
bad input), gate (exit 1 from a failed fidelity gate), BUG (exit 1 from our error, any traceback,
more than one line on stderr, a pass's unexpected Python exception named in the one line, a model a pass made
that onnxruntime will not load, or a crash by signal), and timeout. A BUG row is a bug to fix; a
refusal is worth reading (is it the user's fault, and does the line say what to do?).

With `--data N`, every run gets `--data` too: a feed-list .npz of N feeds the model runs on, synthesized
once per model by onnxcompress.runtime.synthesis (random values, so fidelity figures mean little; what
is tested is the data-driven path: calibration, captures, refits, the guard, the search).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ["share", "share-4bit", "int8", "int8-weights", "int4-weights", "deep-compression-fixed"]
UNEXPECTED = re.compile(r"in pass '[^']+'.*: (TypeError|ValueError|IndexError|KeyError|AttributeError|AssertionError|"
                        r"ZeroDivisionError|NameError|UnboundLocalError|FloatingPointError|LinAlgError|RuntimeError):")
MADE_INVALID = re.compile(r"in pass '[^']+'.*: onnxruntime cannot load the model")
RESERVED = ("magika", "silero", "rapidocr", "ddddocr", "captcha", "minilm")  # never run (kept for evaluation)


def find_models(roots: list[str], max_mb: float) -> list[Path]:
    found = []
    for root in roots:
        path = Path(root)
        files = [path] if path.is_file() else sorted(path.rglob("*.onnx"))
        for f in files:
            if any(word in str(f).lower() for word in RESERVED):
                continue
            if f.stat().st_size <= max_mb * 1e6:
                found.append(f)
    return found


def classify(code: int | None, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if code is None:
        return "timeout"
    if "Traceback" in stderr or code < 0 or code not in (0, 1, 2):
        return "BUG"
    if code == 0:
        return "ok"
    if code == 2:  # one line, unless it is a Python exception a pass did not expect (the manager names its type),
        # or onnxruntime refusing a model a pass made out of one it loaded
        last = lines[-1] if lines else ""
        return "refused" if len(lines) <= 1 and not UNEXPECTED.search(last) and not MADE_INVALID.search(last) else "BUG"
    return "gate" if lines and "gate" in lines[-1].lower() else "BUG"


def synthetic_data(model: Path, n: int, folder: Path) -> Path | None:
    """A feed-list .npz of n synthesized feeds `model` runs on, or None where none can be made (a run
    without --data then shows the reason)."""
    import numpy as np

    from onnxcompress.errors import OnnxCompressError
    from onnxcompress.graph.data import model_inputs
    from onnxcompress.graph.model import load_model
    from onnxcompress.runtime.synthesis import runnable_data

    try:
        loaded = load_model(model)
        specs = model_inputs(loaded)
        data = runnable_data(loaded, specs, n=n)
    except OnnxCompressError:
        return None
    path = folder / f"{model.stem}.calib.npz"
    feeds = [data.feed(i, specs) for i in range(n)]
    np.savez(path, **{f"{i:05d}/{name}": value for i, feed in enumerate(feeds) for name, value in feed.items()})
    return path


def run_one(model: Path, recipe: str, timeout: float, folder: Path, data: Path | None = None) -> dict:
    out = folder / f"{model.stem}.{recipe}.onnx"
    report = folder / f"{model.stem}.{recipe}.report.json"
    cmd = [sys.executable, "-m", "onnxcompress.cli", "compress", str(model), "-o", str(out),
           "--recipe", recipe, "--jobs", "1", "--quiet", "--report", str(report)] + (["--data", str(data)] if data else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, ""
    seconds = time.perf_counter() - start
    row = {"model": str(model), "recipe": recipe, "outcome": classify(code, stderr), "exit": code,
           "seconds": round(seconds, 1), "stderr": stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""}
    if out.exists():
        row["ratio"] = round(model.stat().st_size / max(out.stat().st_size, 1), 2)
        out.unlink()
    if report.exists():  # each output's task kind and agreement: a kind detected wrongly, a fidelity far off
        outputs = (json.loads(report.read_text()).get("validation") or {}).get("outputs") or []
        row["fidelity"] = [{"output": o["name"], "task": o.get("task"), "agreement": o.get("agreement"),
                            "sqnr_db": o.get("sqnr_db")} for o in outputs]
        report.unlink()
    for extra in folder.glob(f"{model.stem}.{recipe}.onnx*"):
        extra.unlink()
    if row["outcome"] == "BUG":
        row["stderr_tail"] = stderr[-3000:]
    return row


def worst(row: dict) -> str:
    """The budgeted-or-not output with the least agreement, and its task kind: 'agree 97.5% y ctc:0 (detected)'."""
    scored = [f for f in row.get("fidelity", []) if f["agreement"] is not None]
    if not scored:
        return ""
    low = min(scored, key=lambda f: f["agreement"])
    return f"agree {100 * low['agreement']:.1f}% {low['output']} {low['task']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", help="folders searched for .onnx files, or files")
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model and recipe")
    parser.add_argument("--max-mb", type=float, default=60, help="skip files larger than this")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--data", type=int, default=0, metavar="N",
                        help="give every run --data: N feeds synthesized once per model (default: no data)")
    args = parser.parse_args(argv)
    models = find_models(args.roots, args.max_mb)
    print(f"{len(models)} models x {len(args.recipes)} recipes", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxcompress-sweep-") as folder:
        for model in models:
            data = synthetic_data(model, args.data, Path(folder)) if args.data else None
            for recipe in args.recipes:
                row = run_one(model, recipe, args.timeout, Path(folder), data)
                rows.append(row)
                print(f"{row['outcome']:8} {row['seconds']:7.1f}s {row.get('ratio', ''):>6} {recipe:24} "
                      f"{os.path.relpath(model)}  {row['stderr'] if row['outcome'] != 'ok' else worst(row)}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    bugs = [r for r in rows if r["outcome"] == "BUG"]
    print(f"\n{len(rows)} runs: " + ", ".join(f"{k} {sum(r['outcome'] == k for r in rows)}"
                                         for k in ("ok", "refused", "gate", "timeout", "BUG")))
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
