"""Thresholds that turn a comparison into a verdict: `validate` and `compress` as a CI gate.

Each threshold is checked on every output it applies to; the verdict lists every check, and
the first failed one is the sentence the command prints before exiting with code 1.
"""
from __future__ import annotations

import dataclasses
import math

from onnxcompress.errors import DataError
from onnxcompress.runtime.metrics import Comparison


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gate:
    """min_agreement: top-1 agreement in percent, on every class-score output; max_drop: accuracy
    points lost against the data's labels; min_sqnr: dB on every output; atol/rtol: every value of
    every output within atol + rtol * |reference| (numpy.isclose; either alone means the other is 0)."""

    min_agreement: float | None = None
    max_drop: float | None = None
    min_sqnr: float | None = None
    atol: float | None = None
    rtol: float | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not math.isfinite(value):
                raise DataError(f"the gate threshold {field.name} must be a finite number, not {value}")
        for name in ("atol", "rtol", "max_drop"):
            if (getattr(self, name) or 0) < 0:
                raise DataError(f"the gate threshold {name} must be >= 0, not {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    @property
    def tolerance(self) -> tuple[float, float] | None:
        """(atol, rtol) for metrics.compare_outputs, or None when neither is set."""
        if self.atol is None and self.rtol is None:
            return None
        return (self.atol or 0.0, self.rtol or 0.0)

    def verdict(self, comparison: Comparison, flags: dict[str, str] | None = None) -> Verdict:
        """Every check on `comparison`. flags: how the command line spells each threshold, for messages.
        DataError when a threshold cannot be measured on these outputs or this data."""
        flag = {f.name: f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(self)} | (flags or {})
        checks: list[Check] = []
        outputs = comparison.outputs
        if self.min_agreement is not None:
            scored = [o for o in outputs if o.top1_agreement is not None]
            if not scored:
                raise DataError(f"{flag['min_agreement']} needs an output of class scores (rank >= 2, last axis "
                                ">= 2); this model has none")
            checks += [Check(o.name, "top-1 agreement", 100 * o.top1_agreement, self.min_agreement, "%",
                             flag["min_agreement"], 100 * o.top1_agreement >= self.min_agreement) for o in scored]
        if self.max_drop is not None:
            drop = comparison.accuracy_drop
            if drop is None:
                raise DataError(f"{flag['max_drop']} needs labels: give data with a 'labels' array "
                                "(one class per sample)")
            name = next(o.name for o in outputs if o.accuracy_reference is not None)
            checks.append(Check(name, "accuracy drop", drop, self.max_drop, " points", flag["max_drop"],
                                drop <= self.max_drop))
        if self.min_sqnr is not None:
            checks += [Check(o.name, "SQNR", o.sqnr_db, self.min_sqnr, " dB", flag["min_sqnr"],
                             o.sqnr_db >= self.min_sqnr) for o in outputs]
        if self.tolerance is not None:
            atol, rtol = self.tolerance
            where = " and ".join(f"{flag[k]} {v:g}" for k, v in (("atol", self.atol), ("rtol", self.rtol))
                                 if v is not None)
            for o in outputs:
                bad = o.outside_tolerance
                if bad is None:
                    raise ValueError("the comparison was made without the gate's tolerance")  # our bug
                checks.append(Check(o.name, "values outside tolerance", bad, 0, "", where, bad == 0,
                                    extra=f"max |diff| {o.max_abs:.4g}"))
        return Verdict(checks)


@dataclasses.dataclass(frozen=True)
class Check:
    output: str
    figure: str
    value: float
    limit: float
    unit: str
    flag: str
    passed: bool
    extra: str = ""

    def sentence(self) -> str:
        if self.figure == "values outside tolerance":
            return (f"output '{self.output}': {self.value:g} values differ from the reference by more than "
                    f"{self.flag} ({self.extra})")
        compare = "below" if self.figure in ("top-1 agreement", "SQNR") else "above"
        return (f"output '{self.output}': {self.figure} {self.value:.4g}{self.unit} is {compare} "
                f"{self.flag} {self.limit:g}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def sentence(self) -> str:
        """One line: the first failure, and how many more."""
        failed = self.failures()
        if not failed:
            return "every check passed"
        more = f" (and {len(failed) - 1} more failed check(s))" if len(failed) > 1 else ""
        return failed[0].sentence() + more

    def as_dict(self) -> dict:
        return {"passed": self.passed,
                "checks": [{"output": c.output, "figure": c.figure, "value": c.value, "limit": c.limit,
                            "flag": c.flag, "passed": c.passed} for c in self.checks]}
