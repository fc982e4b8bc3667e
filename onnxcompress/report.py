"""Human-readable text for reports, comparisons and inspections."""
from __future__ import annotations

import math

from onnxcompress.errors import printable
from onnxcompress.runtime.metrics import Comparison
from onnxcompress.pipeline.outcome import Report
from onnxcompress.runtime.shipped import BROTLI_MAX_BYTES, MEASURE_MAX_BYTES


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(c, newlines=False) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def comparison_text(comparison: Comparison) -> str:
    rows = []
    for o in comparison.outputs:
        acc = (f"{100 * o.accuracy_reference:.2f}% -> {100 * o.accuracy_candidate:.2f}%"
               if o.accuracy_reference is not None else
               f"est. -{100 * o.expected_loss:.2f} pts" if o.expected_loss is not None else "-")
        value = o.agreement if o.agreement is not None else o.top1_agreement
        agree = f"{100 * value:.2f}%" + ("" if o.budgeted or o.agreement is None else " (not budgeted)") \
            + (" (one answer)" if o.one_answer else "") if value is not None else "-"
        rows.append([o.name, _fmt(o.max_abs), _fmt(o.rel_l2), _fmt(o.cosine, ".6f"), _fmt(o.sqnr_db, ".1f"),
                     o.task or "-", agree, acc])
    lines = [table(["output", "max|diff|", "rel L2", "cosine", "SQNR dB", "task", "agreement", "accuracy"], rows)]
    if any(o.task for o in comparison.outputs):
        lines.append("task: what agreement means per output (chosen with --metric KIND, else detected): top1 "
                     "argmax, probability:T decision p >= T, embedding nearest neighbour, sequence whole argmax "
                     "path, ctc greedy text, regression:TOL RMS error <= TOL x the output's RMS")
    where = "random synthesized inputs (weak evidence)" if comparison.synthetic_data else "the given data"
    lines.append(f"{comparison.samples} samples from {where}")
    alike = [o.name for o in comparison.outputs if o.one_answer]
    if alike:
        lines.append(f"one answer: the original gives every one of these inputs the same answer on {', '.join(alike)} "
                     "(e.g. noise holds no text): its agreement there says nothing about the task"
                     + ("; give --data with real inputs" if comparison.synthetic_data else ""))
    if any(o.accuracy_reference is None and o.expected_loss is not None for o in comparison.outputs):
        lines.append("est.: accuracy lost in expectation, with the reference's own class probabilities as labels "
                     "(on the calibration data it is optimistic: the fits learned from those samples)")
    if comparison.size_ratio:
        lines.append(f"size: {human_bytes(comparison.reference_bytes)} -> {human_bytes(comparison.candidate_bytes)} "
                     f"({comparison.size_ratio:.2f}x smaller)")
    if comparison.latency_ratio:
        lines.append(f"latency: {1e3 * comparison.latency_reference_s:.3f} ms -> "
                     f"{1e3 * comparison.latency_candidate_s:.3f} ms (x{comparison.latency_ratio:.2f})")
    return "\n".join(lines)


def report_text(report: Report) -> str:
    lines = []
    if report.input_bytes and report.output_bytes:
        lines.append(f"{printable(report.recipe, newlines=False)} ({report.form}): {human_bytes(report.input_bytes)} -> "
                     f"{human_bytes(report.output_bytes)}, {report.ratio:.2f}x smaller")
    if report.shipped is not None:
        lines.append(shipped_text(report.shipped, report.input_bytes))
    lines.append("passes: " + ", ".join(f"{p.name} {p.seconds:.2f}s" for p in report.passes))
    if report.validation is not None:
        lines.append(comparison_text(report.validation))
    if report.layer_errors:
        lines.append(layer_errors_text(report.layer_errors))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def shipped_text(shipped, original_bytes: int | None) -> str:
    """One line: the output's bytes on disk, gzip -9, brotli -q 11, and float bytes resident once loaded."""
    def size(n: int | None, limit: int = MEASURE_MAX_BYTES) -> str:
        if n is None:
            return f"not measured (over {human_bytes(limit)})"
        ratio = f" ({original_bytes / n:.1f}x)" if n and original_bytes else ""
        return human_bytes(n) + ratio
    if shipped.brotli is not None or shipped.disk > BROTLI_MAX_BYTES:
        brotli = size(shipped.brotli, BROTLI_MAX_BYTES)
    else:
        brotli = "n/a (pip install brotli)"
    resident = (f"{human_bytes(shipped.resident)} of float weights resident in onnxruntime"
                if shipped.resident is not None else "float weights resident in onnxruntime not measured")
    return f"shipped: {size(shipped.disk)} on disk, {size(shipped.gzip)} gzip -9, {brotli} brotli -q 11; {resident}"


def layer_errors_text(errors, limit: int = 12) -> str:
    """The worst quantized tensors first: SQNR against the float model and of their own Q/DQ step."""
    rows = [[e.tensor, e.node, e.op_type, _fmt(e.sqnr_db, ".1f"), _fmt(e.local_sqnr_db, ".1f")]
            for e in errors[:limit]]
    more = f"\n... {len(errors) - limit} more (see --json)" if len(errors) > limit else ""
    return ("per-layer error, worst first (exclude a layer with qdq: {exclude: [node]}):\n"
            + table(["tensor", "node", "op", "SQNR dB", "own Q/DQ dB"], rows) + more)


def inspect_text(info: dict) -> str:
    rows = []
    for w in info["weights"]:
        rows.append([w["name"], "x".join(map(str, w["shape"])) or "scalar", w["dtype"], human_bytes(w["bytes"]),
                     w["role"], w["graph"] + ("" if w["location"] == "initializer" else f" ({w['location']})"),
                     f"{100 * w['sparsity']:.1f}%", "-" if w["distinct"] is None else str(w["distinct"]), w["skip"] or ""])
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    head = [f"{info.get('path') or 'model'}: {human_bytes(info['file_bytes'])}, opsets: {opsets}"
            + (" (packed form)" if info.get("packed") else "")]
    body = table(["weight", "shape", "dtype", "bytes", "role", "where", "zeros", "distinct", "left alone"], rows)
    tail = f"{len(rows)} tensors, {info['total_params']:,} float parameters, {human_bytes(info['float_weight_bytes'])}"
    return "\n".join(head + [body, tail])
