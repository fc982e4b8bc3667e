"""The `onnxcompress` command: compress, validate, inspect, recipes.

Errors a user can fix print one line and exit with code 2; a missed gate threshold prints one line
and exits with code 1; nothing is written on any failure (onnxcompress.graph.outputs).
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import sys
from pathlib import Path

from onnxcompress.arguments import build_parser, EXIT_USER_ERROR
from onnxcompress.errors import BugError, OnnxCompressError, printable, RuntimeMissingError

EXIT_GATE_FAILED = 1  # validate/compress thresholds missed (--min-agreement, --gate-min-sqnr, ...)
EXIT_BUG = 1  # a failed pre- or postcondition inside onnxcompress (BugError)
EXIT_BROKEN_PIPE = 141  # stdout closed early, as a shell reports a tool ended by SIGPIPE


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "value"):
        return value.value
    return str(value)


def _dump(obj) -> str:
    return json.dumps(_finite(obj), indent=2, default=_json_default)


def _finite(obj):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _gate(args, prefix: str):
    from onnxcompress.runtime.gate import Gate

    names = ("min_agreement", "max_drop", "min_sqnr", "atol", "rtol")
    flags = {name: f"--{prefix}{name.replace('_', '-')}" for name in names}
    return Gate(**{name: getattr(args, f"{prefix.replace('-', '_')}{name}") for name in names}), flags



class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped: a warning may quote a name from the model."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    # without -v, warnings are held until the command ends: a failure prints its one line alone
    stream = logging.StreamHandler()
    stream.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
    held = logging.handlers.MemoryHandler(1 << 16, flushLevel=logging.CRITICAL + 1, target=stream) \
        if not args.verbose else None
    logging.basicConfig(level=level, handlers=[held or stream])
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from onnxcompress.graph.spill import exit_on_termination

    exit_on_termination()  # SIGTERM/SIGHUP unwind like Ctrl-C: temporary outputs are removed
    try:  # also while onnxruntime runs the model (it holds the main thread until a run returns)
        from onnxcompress.runtime.sessions import stop_runs_on_signals
    except RuntimeMissingError:  # the commands that run a model say so; the others do not need it
        pass
    else:
        stop_runs_on_signals()
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit
        return code
    except OnnxCompressError as e:
        if held is not None:
            held.buffer.clear()
        print(f"onnxcompress: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:  # a size no check foresaw: still one line, nothing written (outputs are atomic)
        if held is not None:
            held.buffer.clear()
        print("onnxcompress: error: out of memory; nothing was written (the input may declare sizes beyond what "
              "this machine holds)", file=sys.stderr)
        return EXIT_USER_ERROR
    except BugError as e:
        if held is not None:
            held.buffer.clear()
        print(f"onnxcompress: internal error (a bug in onnxcompress, not in your input; please report it "
              f"with the command and the model): {_one_line(e)}", file=sys.stderr)
        return EXIT_BUG
    except KeyboardInterrupt:
        print("onnxcompress: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the report went away (`| head`): no bug, and OUT may be in place
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a second error at exit's flush
        return EXIT_BROKEN_PIPE
    except Exception as e:  # anything unforeseen is our bug: one line, not a traceback (-vv logs it)
        if held is not None:
            held.buffer.clear()
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        print(f"onnxcompress: internal error (a bug in onnxcompress; please report it with the command and the "
              f"model); nothing was written: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_BUG
    finally:
        if held is not None:
            held.flush()


MAX_ERROR_CHARS = 2000  # an error quoting a 20,000-character name or a 4,000-digit shape stays readable


def _one_line(error: BaseException) -> str:
    text = printable(" ".join(str(error).split()))
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def _show(text: str, **kwargs) -> None:
    """Print report text with the control characters a model's names may hold escaped (errors.printable)."""
    print(printable(text), **kwargs)


def _compress(args) -> int:
    from onnxcompress.api import input_roles
    from onnxcompress.errors import OutputError
    from onnxcompress.graph.model import output_roles
    from onnxcompress.graph.outputs import OutputPlan, Role
    from onnxcompress.plots import plot_paths, plot_report
    from onnxcompress.report import report_text

    if getattr(args, "quiet", False):
        logging.getLogger().setLevel(logging.ERROR)
    gate, flags = _gate(args, "gate-")
    if gate.active and args.validate == "none":
        raise OnnxCompressError("the --gate-* thresholds are checked on the validation: drop --validate none")
    writes = output_roles(args.output)
    if args.report:
        prefix = Path(args.report).with_suffix("")
        writes += [Role("the report", Path(args.report))] + [Role("a plot", path) for path in plot_paths(prefix)]
    reads = input_roles(args.model, data=args.data, eval_data=args.eval_data, recipe=args.recipe)
    notes = []
    with OutputPlan(writes, reads).check() as plan:
        report = _compress_file(args, plan, gate.tolerance)
        verdict = _verdict(report, gate, flags)
        result = report.as_dict() | ({"verdict": verdict.as_dict()} if verdict else {})
        if verdict is not None and not verdict.passed:
            _show(_dump(result) if args.json else report_text(report))
            _show(f"onnxcompress: gate failed: {verdict.sentence()}; nothing was written", file=sys.stderr)
            return EXIT_GATE_FAILED
        if args.report:
            try:
                plan.temp(args.report).write_text(_dump(result))
                notes = plot_report(report, prefix, plan.temp)
            except OSError as e:
                raise OutputError(f"cannot write the report '{args.report}': {e.strerror or e}") from e
        plan.commit()
    for note in notes:
        _show(note, file=sys.stderr)
    _show(_dump(result) if args.json else report_text(report))
    return 0


def _compress_file(args, plan, tolerance):
    """Compress as the arguments say, on the chosen executor (local cores or a Ray cluster), into `plan`."""
    if args.executor != "ray":
        return _compress_on(args, plan, tolerance, None)
    from onnxcompress.execution.ray_executor import RayExecutor

    # started first, in the background: Ray's start-up and its workers' imports overlap ours, loading and the passes
    executor = RayExecutor(args.ray_address, num_cpus=args.jobs, preload=("onnxcompress.passes",)).start()
    try:
        return _compress_on(args, plan, tolerance, executor)
    finally:
        executor.close()


def _compress_on(args, plan, tolerance, executor):
    """_compress_file on `executor`, or on --jobs local cores when it is None."""
    from onnxcompress.api import compress_file
    from onnxcompress.execution.memory import keep_freed_memory
    from onnxcompress.execution.parallel import available_cores
    from onnxcompress.graph.synthesized import parse_shapes

    budget = {key: value for key, value in (("max_drop", args.max_drop), ("min_sqnr", args.min_sqnr),
                                            ("target_ratio", args.target_ratio), ("metric", args.metric))
              if value is not None}
    jobs = executor or args.jobs or available_cores()
    keep_freed_memory()  # this process is the tool's: freed buffers stay for the next weight (--jobs 1 runs here)
    return compress_file(args.model, args.output, args.recipe, data=args.data, eval_data=args.eval_data,
                         form=args.form, validate=args.validate, shapes=parse_shapes(args.shape),
                         samples=args.samples, progress=not args.quiet and sys.stderr.isatty(), jobs=jobs,
                         budget=budget, tolerance=tolerance, plan=plan)


def _verdict(report, gate, flags):
    """The --gate-* verdict on the report's validation (None: no gate)."""
    if not gate.active:
        return None
    if report.validation is None:
        raise OnnxCompressError("the --gate-* thresholds cannot be checked: the validation was skipped "
                                f"({'; '.join(report.notes) or 'no data'}); nothing was written")
    return gate.verdict(report.validation, flags)


def _validate(args) -> int:
    from onnxcompress.api import validate
    from onnxcompress.graph.synthesized import parse_shapes
    from onnxcompress.report import comparison_text

    gate, flags = _gate(args, "")
    comparison = validate(args.reference, args.candidate, args.data, shapes=parse_shapes(args.shape),
                          samples=args.samples, latency=args.latency, tolerance=gate.tolerance, metric=args.metric)
    verdict = gate.verdict(comparison, flags)
    if args.json:
        print(_dump(comparison.as_dict() | {"verdict": verdict.as_dict()}))
    else:
        _show(comparison_text(comparison))
        if gate.active:
            print(f"gate: {'passed' if verdict.passed else 'FAILED'} ({len(verdict.checks)} checks)")
    if not verdict.passed:
        _show(f"onnxcompress: validate failed: {verdict.sentence()}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


def _inspect(args) -> int:
    from onnxcompress.api import inspect
    from onnxcompress.report import inspect_text

    info = inspect(args.model, min_elements=args.min_elements)
    _show(_dump(info) if args.json else inspect_text(info))
    if info.get("packed_weights") and not args.json:
        _show(_packed_text(info["packed_weights"]))
    return 0


def _packed_text(rows: list[dict]) -> str:
    from onnxcompress.report import human_bytes, table

    body = [[r["name"], "x".join(map(str, r["shape"])), str(r["bits"]), r["layout"], f"{100 * r['nonzero']:.1f}%",
             human_bytes(r["stored_bytes"]), f"{r['bits_per_weight']:.3f}",
             ", ".join(f"{k}:{v['method']} {v['bits_per_weight']:.3f}" for k, v in r["streams"].items())]
            for r in rows]
    return "packed weights (streams: b codebook, c codes, i relative indices, v sparse codes, s scales, " \
           "g group offsets, o/u outliers; bits per weight)\n" + \
        table(["weight", "shape", "bits", "layout", "nonzero", "stored", "bits/weight", "streams"], body)


def _unpack(args) -> int:
    from onnxcompress.api import unpack_file
    from onnxcompress.report import human_bytes

    before, after = unpack_file(args.model, args.output)
    print(f"unpacked {args.model} ({human_bytes(before)}) -> {args.output} ({human_bytes(after)}, portable)")
    return 0


def _recipes(args) -> int:
    from onnxcompress.recipes import BUILTIN, DESCRIPTIONS, FORMS

    if args.options:
        from onnxcompress.recipes.options import options_json, options_text

        print(options_json() if args.json else options_text(), end="\n" if args.json else "")
        return 0
    if args.json:
        print(json.dumps([{"recipe": name, "description": DESCRIPTIONS.get(name, ""),
                           "form": FORMS.get(name, "portable"), "passes": [{"pass": p, "options": o} for p, o in steps]}
                          for name, steps in BUILTIN.items()], indent=2))
        return 0
    for name, steps in BUILTIN.items():
        width = max(map(len, BUILTIN)) + 1
        print(f"{name:{width}s} {DESCRIPTIONS.get(name, '')}")
        print(f"{'':{width}s} passes: {', '.join(p for p, _ in steps)}")
    return 0


_COMMANDS = {"compress": _compress, "validate": _validate, "inspect": _inspect, "recipes": _recipes, "unpack": _unpack}

if __name__ == "__main__":
    sys.exit(main())
