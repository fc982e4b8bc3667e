"""The typed artifacts passes hand to each other through the Context (pipeline layer).

A pass declares the artifacts it ``produces`` and ``consumes`` (:class:`Artifact` members); the
manager marks an artifact available once its producer has run and checks a consumer's before it
runs. The data itself lives in the Context's typed fields: ``calibration`` (a
:class:`CalibrationResult`), ``masks``, ``shared``, ``layouts``, ``packed`` and ``plan`` (a
:class:`SearchPlan`, which the search-then-verify composite reads to back off).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from onnxcompress.runtime.tasks import is_builtin

if TYPE_CHECKING:
    from onnxcompress.runtime.metrics import Comparison


class Artifact(enum.Enum):
    """What one pass leaves in the Context for later ones (the value names it in messages)."""

    CALIBRATION = "activation ranges"
    MASKS = "pruning masks"
    SHARED = "shared (codebook) weights"
    LAYOUTS = "sparse layouts"
    PACKED = "entropy-coded blobs"
    PLAN = "a per-layer search plan"


@dataclass(frozen=True)
class LayerChoice:
    """The settings the search chose for one weight."""

    bits: int
    sparsity: float


@dataclass
class Verified:
    """One configuration the search applied jointly and measured (a point of the size/fidelity front)."""

    bytes: int
    ratio: float
    predicted: float  # the loss the allocation predicted (per-layer losses added up)
    check: float  # the loss measured with every weight of the choice changed together
    cost: float
    ok: bool  # within the budget
    choice: dict[str, LayerChoice]


@dataclass(frozen=True)
class Budget:
    """What the search's result must meet: one of a loss bound (points of accuracy, or the worst output's SQNR)
    or a size ratio, and how a loss is counted (a user's metric, labelled or unlabelled data)."""

    max_drop: float | None = None
    min_sqnr: float | None = None
    target_ratio: float | None = None
    metric: str | None = None
    unlabelled: str = "expected"

    def check(self, comparison: Comparison | None, ratio: float) -> tuple[bool, float | None]:
        """(met, measured) for a validated result: the ratio for a size budget, else the loss."""
        if self.target_ratio is not None:
            return ratio >= self.target_ratio, ratio
        if comparison is None or (self.metric and not is_builtin(self.metric)):
            return True, None
        if self.min_sqnr is not None:
            worst = min(o.sqnr_db for o in comparison.outputs)
            return worst >= self.min_sqnr, worst
        drop = None if self.metric else comparison.accuracy_drop  # a chosen kind: its agreement
        if drop is None and self.unlabelled == "expected":
            drop = comparison.expected_drop
        if drop is None:
            agreement = comparison.worst_agreement()
            drop = None if agreement is None else 100.0 * (1.0 - agreement)
        return (True, None) if drop is None else (drop <= self.max_drop + 1e-9, drop)


@dataclass
class SearchPlan:
    """The search's result: per-weight choices, every verified configuration, and the budget they answer to.
    `searched` is False when the search was skipped (no data): the passes after it keep their defaults."""

    budget: Budget
    choices: dict[str, LayerChoice] = field(default_factory=dict)
    evaluated: list[Verified] = field(default_factory=list)
    searched: bool = True

    def bits(self, name: str) -> int | None:
        choice = self.choices.get(name)
        return None if choice is None else choice.bits

    def sparsity(self, name: str) -> float | None:
        choice = self.choices.get(name)
        return None if choice is None else choice.sparsity

    def fallbacks(self) -> list[dict[str, LayerChoice]]:
        """The choices to verify end to end, in order: the chosen one, then every other configuration that
        met the budget in the search, toward larger files for a loss budget, smaller ones for a size budget."""
        ladder = sorted(self.evaluated, key=lambda v: v.bytes, reverse=self.budget.target_ratio is not None)
        return [self.choices] + [v.choice for v in ladder if v.ok and v.choice != self.choices]

    def with_choices(self, choices: dict[str, LayerChoice]) -> SearchPlan:
        return replace(self, choices=dict(choices))
