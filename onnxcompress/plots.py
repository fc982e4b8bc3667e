"""Pictures of a bit-width search: the size/fidelity front and per-layer sensitivity curves.

matplotlib is optional (`pip install onnxcompress[plot]`); without it the report says so.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from onnxcompress.errors import printable
from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.pipeline.outcome import Report


def search_summary(report: Report) -> dict | None:
    """The report of the pass that made a search plan, when it searched."""
    return next((p.summary for p in report.passes if Artifact.PLAN in p.produced and "evaluated" in p.summary), None)


def plot_paths(prefix: Path) -> list[Path]:
    """The files plot_report may write."""
    return [Path(f"{prefix}.pareto.png"), Path(f"{prefix}.sensitivity.png")]


def plot_report(report: Report, prefix: Path, stage: Callable[[Path], Path]) -> list[str]:
    """Draw PREFIX.pareto.png and PREFIX.sensitivity.png for a bit-width search; return notes.
    stage: the temporary file to write for each of them (an OutputPlan's temp, committed by the caller)."""
    summary = search_summary(report)
    if summary is None:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install 'onnxcompress[plot]')"]
    pareto, sensitivity = plot_paths(prefix)
    written = [_pareto(plt, summary, pareto, stage), _sensitivity(plt, summary, sensitivity, stage)]
    return [f"wrote {path}" for path in written]


def _loss_label(summary: dict) -> str:
    budget = summary["budget"]
    if budget.get("min_sqnr") is not None:
        return "noise-to-signal ratio of the outputs"
    return "loss (accuracy points, or top-1 disagreement without labels)"


def _save(fig, path: Path, stage) -> Path:
    fig.savefig(stage(path), dpi=120, bbox_inches="tight", format="png")
    return path


def _pareto(plt, summary: dict, path: Path, stage) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = summary["evaluated"]
    ok = [p for p in points if p["ok"]]
    bad = [p for p in points if not p["ok"]]
    ax.scatter([p["ratio"] for p in ok], [p["check"] for p in ok], c="tab:green", label="meets the budget")
    ax.scatter([p["ratio"] for p in bad], [p["check"] for p in bad], c="tab:red", marker="x", label="exceeds it")
    front = sorted(summary["front"], key=lambda p: p["ratio"])
    ax.plot([p["ratio"] for p in front], [p["check"] for p in front], c="gray", lw=1, label="front")
    budget = summary["budget"]
    if budget.get("max_drop") is not None:
        ax.axhline(budget["max_drop"], ls="--", c="black", lw=0.8, label=f"budget {budget['max_drop']}")
    ax.set_xlabel("predicted whole-file compression ratio (x)")
    ax.set_ylabel(_loss_label(summary))
    ax.set_title("Configurations evaluated by the bit-width search")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    try:
        return _save(fig, path, stage)
    finally:
        plt.close(fig)


MAX_PANELS = 32  # weights drawn in the sensitivity figure (each panel is 3.2 inches wide)


def _title(name: str) -> str:
    """A weight's name as a plot title: control characters escaped, at most 60 characters (drawn with
    parse_math=False, so a '$' in it is no TeX)."""
    shown = printable(name, newlines=False)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _sensitivity(plt, summary: dict, path: Path, stage) -> Path:
    table = dict(list(summary["sensitivity"].items())[:MAX_PANELS])  # 500 panels: an image too wide to save
    fig, axes = plt.subplots(1, len(table), figsize=(3.2 * len(table), 3.2), squeeze=False, sharey=True)
    for ax, (name, candidates) in zip(axes[0], table.items()):
        for sparsity in sorted({c["sparsity"] for c in candidates}):
            rows = sorted((c for c in candidates if c["sparsity"] == sparsity and c["error"] is None),
                          key=lambda c: c["bits"])
            ax.plot([c["bits"] for c in rows], [c["cost"] for c in rows], marker="o", ms=3,
                    label=f"{100 * sparsity:.0f}% pruned")
        choice = summary["choices"].get(name, {})
        ax.set_title(f"{_title(name)}\nchosen: {choice.get('bits')} bits, {100 * choice.get('sparsity', 0):.0f}% pruned",
                     fontsize=8, parse_math=False)
        ax.set_xlabel("codebook bits")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss with only this layer changed")
    axes[0][-1].legend(fontsize=7)
    more = len(summary["sensitivity"]) - len(table)
    fig.suptitle("Per-layer sensitivity (cf. Han et al. 2016, Figure 7)" + (f"; {more} more weights in the report"
                                                                             if more > 0 else ""), fontsize=10, y=1.08)
    try:
        return _save(fig, path, stage)
    finally:
        plt.close(fig)
