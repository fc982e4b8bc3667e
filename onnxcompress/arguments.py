"""The command line's grammar: the parser of every `onnxcompress` command and its options, with usage
errors as one line (exit 2). cli.py runs the commands.
"""
from __future__ import annotations

import argparse

from onnxcompress import __version__
from onnxcompress.formats.forms import Form

EXIT_USER_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return value


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from onnxcompress.graph.data import MAX_SAMPLES

    parser.add_argument("--samples", type=_count, default=MAX_SAMPLES, metavar="N",
                        help=f"read at most the first N samples of each data file or folder (default {MAX_SAMPLES}; "
                             "0: all of them)")
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
