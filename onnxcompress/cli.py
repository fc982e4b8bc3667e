"""The `onnxcompress` command: compress, validate, inspect, recipes.

Errors a user can fix print one line and exit with code 2; a missed gate threshold prints one line
and exits with code 1; nothing is written on any failure (onnxcompress.graph.outputs).
"""
from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import math
import os
import sys
from pathlib import Path

from onnxcompress import __version__
from onnxcompress.errors import BugError, OnnxCompressError, printable
from onnxcompress.formats.forms import Form

EXIT_USER_ERROR = 2
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="shape of a dynamic input for synthesized data (repeatable), e.g. input=1,3,224,224")


def _add_gate_options(group, prefix: str) -> None:
    group.add_argument(f"--{prefix}min-agreement", type=float, metavar="PCT",
                       help="smallest top-1 agreement with the reference, in percent, on every class-score output")
    group.add_argument(f"--{prefix}max-drop", type=float, metavar="POINTS",
                       help="largest accuracy loss in points against the data's labels (needs labels)")
    group.add_argument(f"--{prefix}min-sqnr", type=float, metavar="DB", help="smallest SQNR in dB, on every output")
    group.add_argument(f"--{prefix}atol", type=float, metavar="A",
                       help="every output value within A + R x |reference| (with --rtol R; default 0)")
    group.add_argument(f"--{prefix}rtol", type=float, metavar="R", help="see --atol (default 0)")


def _gate(args, prefix: str):
    from onnxcompress.runtime.gate import Gate

    names = ("min_agreement", "max_drop", "min_sqnr", "atol", "rtol")
    flags = {name: f"--{prefix}{name.replace('_', '-')}" for name in names}
    return Gate(**{name: getattr(args, f"{prefix.replace('-', '_')}{name}") for name in names}), flags


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit 2), like every other error of ours."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"onnxcompress: error: {' '.join(message.split())} "
                                   f"(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxcompress",
        description="Make trained ONNX models much smaller (pruning, k-means weight sharing, quantization, "
                    "entropy coding) and check in onnxruntime that they still compute the same thing.")
    parser.add_argument("--version", action="version", version=f"onnxcompress {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_compress, _add_validate, _add_inspect, _add_unpack, _add_recipes):
        add(sub)
    return parser


def _add_compress(sub) -> None:
    """The compress command and its options."""
    from onnxcompress.recipes import BUILTIN, DESCRIPTIONS

    recipes = "\n".join(f"  {name:26s} {DESCRIPTIONS.get(name, '')}" for name in BUILTIN)
    p = sub.add_parser("compress", help="compress a model with a recipe",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compress MODEL with a recipe and write OUT atomically; the input is never "
                                   "modified. Prints the size ratio, time per pass and fidelity.",
                       epilog=f"built-in recipes:\n{recipes}\nor a recipe .yaml file:\n"
                              "  passes:\n    - share: {bits_fc: 4}")
    p.add_argument("model", help="the ONNX model to compress")
    p.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    p.add_argument("--recipe", default="share", help="built-in recipe name or recipe .yaml file (default: share)")
    p.add_argument("--data", help="calibration data: .npz or folder (see README: Data formats)")
    p.add_argument("--eval-data", help="data to measure fidelity on (default: --data, else random inputs)")
    p.add_argument("--form", choices=[f.value for f in Form], help="output form (default: the recipe's)")
    p.add_argument("--validate", choices=["end", "each", "none"], default="end",
                   help="compare with the original in onnxruntime at the end, after each pass, or not at all")
    p.add_argument("--report", metavar="REPORT.json", help="also write the full report as JSON")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="worker processes for per-weight work (default: the number of cores; results do not "
                        "depend on it); with --executor ray, the CPUs of the local Ray instance")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where per-weight work runs: worker processes here (local), or Ray tasks (pip install "
                        "'onnxcompress[ray]'; the model's folder must be on a filesystem the workers share); same "
                        "output either way")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="a running Ray cluster (e.g. auto, ray://head:10001); default: start a local Ray instance")
    _add_budget_and_gate_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only the result")
    _add_data_options(p)


def _add_budget_and_gate_options(p) -> None:
    """compress's budget of the bit-width search and its gate."""
    budget = p.add_argument_group("budget of the bit-width search (recipes 'auto' and 'deep-compression', whose "
                                  "own default is --max-drop 1); give one")
    budget.add_argument("--max-drop", type=float, metavar="POINTS",
                        help="largest accuracy loss in points, e.g. 0.5; without labels the loss expected with the "
                             "original's class probabilities as labels (the bitwidth option unlabelled: agreement "
                             "counts every changed decision instead)")
    budget.add_argument("--min-sqnr", type=float, metavar="DB", help="smallest output SQNR in dB")
    budget.add_argument("--target-ratio", type=float, metavar="X", help="whole-file ratio to reach, e.g. 30")
    budget.add_argument("--metric", metavar="KIND|MODULE:FUNCTION",
                        help="what agreement means: top1, probability[:T], embedding, sequence, ctc[:BLANK] or "
                             "regression[:TOL[:GATE]], optionally @OUTPUT[+OUTPUT] (default: detected per output), or your "
                             "function f(outputs, data) -> number (higher is better); --max-drop bounds its loss")
    gate = p.add_argument_group("gate: fail (exit 1, nothing written) when the validated result misses a threshold; "
                                "the same checks as validate's --min-agreement, --max-drop, --min-sqnr, --atol, "
                                "--rtol, named --gate-* here because --max-drop/--min-sqnr set the search budget")
    _add_gate_options(gate, prefix="gate-")


def _add_validate(sub) -> None:
    """The validate command and its options."""
    p = sub.add_parser("validate", help="compare a compressed model with its reference",
                       description="Run REFERENCE and CANDIDATE on the same data in onnxruntime and compare every "
                                   "output: max |diff|, relative L2, cosine, SQNR, top-1 agreement, accuracy "
                                   "(when the data has labels), size and latency.")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--data", help="data to compare on (default: random inputs from the model's shapes)")
    p.add_argument("--latency", action="store_true", help="also time both models (median, same process)")
    p.add_argument("--metric", metavar="KIND", help="what agreement means: top1, probability[:T], embedding, sequence, "
                                                    "ctc[:BLANK], regression[:TOL[:GATE]] [@OUTPUT] (default: detected)")
    p.add_argument("--json", action="store_true", help="print JSON (with the gate's verdict)")
    _add_gate_options(p.add_argument_group("gate: exit 1 with one line naming the output and the figure when a "
                                           "threshold is missed"), prefix="")
    _add_data_options(p)


def _add_inspect(sub) -> None:
    """The inspect command."""
    p = sub.add_parser("inspect", help="list a model's weights, sizes and roles",
                       description="File size, opsets, and one row per weight: name, shape, dtype, bytes, role, "
                                   "where it lives, sparsity and distinct values.")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--min-elements", type=int, default=256, help="tensors smaller than this are marked tiny")


def _add_unpack(sub) -> None:
    """The unpack command."""
    p = sub.add_parser("unpack", help="turn a packed model into a portable one (standard ONNX ops only)",
                       description="Decode every packed weight of PACKED and write the portable codebook form "
                                   "(bit-packed codes, integer ops, Gather) that stock onnxruntime runs.")
    p.add_argument("model", help="the packed model")
    p.add_argument("-o", "--output", required=True, help="where to write the portable model")


def _add_recipes(sub) -> None:
    """The recipes command."""
    p = sub.add_parser("recipes", help="list the built-in recipes, or every pass option (--options)")
    p.add_argument("--options", action="store_true",
                   help="list every option of every pass: type, default and help (what a recipe file may set)")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")


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


def _one_line(error: BaseException) -> str:
    return printable(" ".join(str(error).split()))


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
    from onnxcompress.api import compress_file
    from onnxcompress.execution.memory import keep_freed_memory
    from onnxcompress.execution.parallel import available_cores
    from onnxcompress.graph.synthesized import parse_shapes

    budget = {key: value for key, value in (("max_drop", args.max_drop), ("min_sqnr", args.min_sqnr),
                                            ("target_ratio", args.target_ratio), ("metric", args.metric))
              if value is not None}
    jobs = args.jobs or available_cores()
    keep_freed_memory()  # this process is the tool's: freed buffers stay for the next weight (--jobs 1 runs here)
    if args.executor == "ray":
        from onnxcompress.execution.ray_executor import RayExecutor

        jobs = RayExecutor(args.ray_address, num_cpus=args.jobs)
    try:
        return compress_file(args.model, args.output, args.recipe, data=args.data, eval_data=args.eval_data,
                             form=args.form, validate=args.validate, shapes=parse_shapes(args.shape),
                             progress=not args.quiet and sys.stderr.isatty(), jobs=jobs,
                             budget=budget, tolerance=tolerance, plan=plan)
    finally:
        if args.executor == "ray":
            jobs.close()


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
                          latency=args.latency, tolerance=gate.tolerance, metric=args.metric)
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
