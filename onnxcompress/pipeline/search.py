"""Search then verify: a composite pass that checks a per-layer search's plan end to end (pipeline layer).

The bit-width pass allocates from per-layer sensitivities and checks its choice jointly, but it
simulates the passes after it. Here the real passes run with the chosen plan, the result is
validated, and while the measured loss misses the budget the passes after the search run again
with the next-safer configuration the search verified (the plan's fallbacks) — the sensitivity
sweep is not repeated. Everything it reads is the typed :class:`~onnxcompress.pipeline.artifacts.SearchPlan`.
"""
from __future__ import annotations

import dataclasses
import logging


from onnxcompress.pipeline.artifacts import Artifact, LayerChoice, SearchPlan
from onnxcompress.pipeline.manager import Context, Pass, PassManager, PassResult, run_step, validated
from onnxcompress.pipeline.outcome import WeightRecord

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4


class SearchThenVerify(Pass):
    """`search` (a pass producing Artifact.PLAN), then `rest` with the plan, verified against the plan's budget
    and re-run with the plan's fallbacks while it misses it (at most `attempts` runs)."""

    name = "search-then-verify"
    composite = True

    def __init__(self, *, search: Pass, rest: PassManager, attempts: int = MAX_ATTEMPTS):
        if Artifact.PLAN not in search.produces:
            raise TypeError(f"pass '{search.name}' makes no search plan to verify")
        self.config = None
        self.search, self.rest, self.attempts = search, rest, attempts

    def parts(self) -> list[Pass]:
        return [self.search, *self.rest.parts()]

    @property
    def produces(self):
        return self.search.produces | self.rest.produces

    @property
    def consumes(self):
        return self.search.consumes | (self.rest.consumes - self.search.produces)

    def call(self, ctx: Context) -> PassResult:
        first = len(ctx.records)
        run_step(self.search, ctx)
        searched, plan, after = ctx.timings[-1], ctx.plan, len(ctx.records)
        if ctx.verify is None or plan is None or not plan.searched:
            # not validating, or nothing searched (no data): the plan as it is, nothing to verify
            return self.rest.call(ctx)
        attempts, trial = [], None  # each attempt runs on a fork of the context as the search left it
        for choices in plan.fallbacks()[: self.attempts]:
            trial = self._attempt(ctx, plan, choices)
            met, measured = plan.budget.check(trial.validation, ctx.original.ByteSize() / max(trial.model.ByteSize(), 1))
            attempts.append({"plan": _settings(choices), "measured": measured, "met": met,
                             "bytes": trial.model.ByteSize(), "choices": choices})
            if met:
                break
            log.warning("%s: the chosen plan measured %.3g end to end, over the budget; backing off",
                        self.search.name, measured)
        if not attempts[-1]["met"]:
            # none met: keep the attempt that came closest (least loss; for a size budget, most ratio)
            pick = max if plan.budget.target_ratio is not None else min
            closest = pick(range(len(attempts)), key=lambda i: attempts[i]["measured"])
            if closest != len(attempts) - 1:
                trial = self._attempt(ctx, plan, attempts[closest]["choices"])
            trial.note(f"{self.search.name}: none of the {len(attempts)} verified plans met the budget end to end; "
                       f"kept the closest (measured {attempts[closest]['measured']:.3g})")
        elif len(attempts) > 1:
            trial.note(f"{self.search.name}: backed off {len(attempts) - 1} time(s) after end-to-end validation")
        ctx.adopt(trial)
        for attempt in attempts:
            del attempt["choices"]
        searched.summary["choices"], searched.summary["end_to_end"] = _settings(ctx.plan.choices), attempts
        # the weights' lines of the search: the plan that was kept
        ctx.records[first:after] = [WeightRecord(name, self.search.name, f"planned {c.bits} bits, sparsity "
                                                 f"{c.sparsity:.2f}", details=dataclasses.asdict(c))
                                    for name, c in ctx.plan.choices.items()]
        return PassResult(True)

    def __repr__(self) -> str:
        return f"SearchThenVerify(search={self.search!r}, rest={self.rest!r})"

    def _attempt(self, base: Context, plan: SearchPlan, choices: dict[str, LayerChoice]) -> Context:
        """The passes after the search, run on a fork of `base` with `choices`, validated."""
        trial = base.fork()
        trial.plan = plan.with_choices(choices)
        self.rest.call(trial)
        if trial.validation is None:
            trial.validation = validated(trial, "end")
        return trial


def _settings(choices: dict[str, LayerChoice]) -> dict[str, dict]:
    return {name: dataclasses.asdict(c) for name, c in choices.items()}
