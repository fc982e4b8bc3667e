"""End-to-end back-off for recipes that search per-layer settings.

The bit-width pass allocates from per-layer sensitivities and checks its choice jointly, but it
simulates the passes after it. Here the real passes run with the chosen plan, the result is
validated, and while the measured loss exceeds the budget the downstream passes run again with
the next-safer configuration the search verified — the sensitivity sweep is not repeated.
"""
from __future__ import annotations

import logging

import onnx

from onnxcompress.graph.data import Dataset
from onnxcompress.runtime.metrics import Comparison
from onnxcompress.pipeline.manager import Pass, PassManager, Report, WeightRecord
from onnxcompress.runtime.tasks import is_builtin

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4


def budget_check(config, comparison: Comparison | None, ratio: float) -> tuple[bool, float | None]:
    """(met, measured) for the budget of a bit-width config: the ratio for a size budget, else the loss."""
    if config.target_ratio is not None:
        return ratio >= config.target_ratio, ratio
    if comparison is None or (config.metric and not is_builtin(config.metric)):
        return True, None
    if config.min_sqnr is not None:
        worst = min(o.sqnr_db for o in comparison.outputs)
        return worst >= config.min_sqnr, worst
    drop = None if config.metric else comparison.accuracy_drop  # a chosen kind: its agreement
    if drop is None and config.unlabelled == "expected":
        drop = comparison.expected_drop
    if drop is None:
        agreement = comparison.worst_agreement()
        drop = None if agreement is None else 100.0 * (1.0 - agreement)
    return (True, None) if drop is None else (drop <= config.max_drop + 1e-9, drop)


def run_with_backoff(passes: list[Pass], manager: PassManager, model: onnx.ModelProto, data: Dataset | None,
                     eval_data: Dataset | None) -> tuple[onnx.ModelProto, Report]:
    """Run `passes`; when they start with a bit-width search, verify its plan end to end."""
    index = next((i for i, p in enumerate(passes) if p.name == "bitwidth"), None)
    if index is None or manager.validate == "none":
        return manager.run(model, data, eval_data)
    head = PassManager(passes[: index + 1], recipe=manager.recipe, validate="none", form=manager.form,
                       jobs=manager.jobs, progress=manager.progress, task=manager.task)
    tail = PassManager(passes[index + 1:], recipe=manager.recipe, validate=manager.validate, form=manager.form,
                       jobs=manager.jobs, progress=manager.progress, task=manager.task)
    searched, head_report = head.run(model, data, eval_data)
    summary = head_report.passes[index].summary
    config = passes[index].config
    if summary.get("skipped"):  # no data to search with: the passes' fixed defaults, nothing to verify
        compressed, report = tail.run(searched, data, eval_data)
        report.passes = head_report.passes + report.passes
        report.notes = head_report.notes + report.notes
        return compressed, report
    start = summary.get("choices", {})
    # loss budgets back off toward larger files; size budgets toward smaller ones
    ladder = sorted(summary.get("evaluated", []), key=lambda p: p["bytes"], reverse=config.target_ratio is not None)
    plans = [start] + [p["choice"] for p in ladder if p["ok"] and p["choice"] != start]
    attempts = []
    for plan in plans[:MAX_ATTEMPTS]:
        compressed, report = tail.run(searched, data, eval_data, plan=plan)
        size = compressed.ByteSize()
        met, measured = budget_check(config, report.validation, model.ByteSize() / max(size, 1))
        attempts.append({"plan": plan, "measured": measured, "met": met, "bytes": size})
        if met:
            break
        log.warning("bitwidth: the chosen plan measured %.3g end to end, over the budget; backing off", measured)
    if not attempts[-1]["met"]:
        # none met: keep the attempt that came closest (least loss; for a size budget, most ratio)
        closest = (max if config.target_ratio is not None else min)(range(len(attempts)),
                                                                      key=lambda i: attempts[i]["measured"])
        if closest != len(attempts) - 1:
            compressed, report = tail.run(searched, data, eval_data, plan=attempts[closest]["plan"])
        plan = attempts[closest]["plan"]
        report.notes.append(f"bitwidth: none of the {len(attempts)} verified plans met the budget end to end; kept "
                            f"the closest (measured {attempts[closest]['measured']:.3g})")
    summary["choices"], summary["end_to_end"] = plan, attempts
    if attempts[-1]["met"] and len(attempts) > 1:
        report.notes.append(f"bitwidth: backed off {len(attempts) - 1} time(s) after end-to-end validation")
    report.passes = head_report.passes + report.passes
    planned = [WeightRecord(name, "bitwidth", "planned {bits} bits, sparsity {sparsity:.2f}".format(**settings),
                            details=dict(settings)) for name, settings in plan.items()]
    report.weights = planned + report.weights
    report.notes = head_report.notes + report.notes
    return compressed, report
