"""What a compression run did: per pass (PassTiming), per weight (WeightRecord), and the whole
run's Report that report.py prints and api.compress returns.

Pipeline layer: records only, filled by the manager (pipeline/manager.py) and the passes through
``Context.record``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from onnxcompress.pipeline.artifacts import Artifact
from onnxcompress.runtime.layer_errors import LayerError
from onnxcompress.runtime.metrics import Comparison


@dataclass
class WeightRecord:
    """What one pass did to one weight, for the report."""

    name: str
    pass_name: str
    action: str  # e.g. "shared 5 bits", "pruned 92%", "skipped"
    bytes_before: int | None = None
    bytes_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)



@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool
    summary: dict[str, Any]
    validation: Comparison | None = None
    produced: frozenset[Artifact] = frozenset()  # what the pass declares it makes (a search plan, say)


@dataclass
class Report:
    recipe: str
    passes: list[PassTiming] = field(default_factory=list)
    weights: list[WeightRecord] = field(default_factory=list)
    validation: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    input_bytes: int | None = None
    output_bytes: int | None = None
    form: str = "portable"
    layer_errors: list[LayerError] = field(default_factory=list)  # per quantized tensor, worst first
    shipped: Any = None  # the output file's shipped.ShippedSize (disk, gzip, brotli, resident), when written
    artifacts: frozenset[Artifact] = frozenset()  # what the passes made (shared weights, a search plan, ...)

    @property
    def ratio(self) -> float | None:
        return self.input_bytes / self.output_bytes if self.input_bytes and self.output_bytes else None

    def as_dict(self) -> dict:
        return {
            "recipe": self.recipe, "form": self.form, "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes, "ratio": self.ratio,
            "shipped": self.shipped.as_dict() if self.shipped is not None else None,
            "passes": [{"name": p.name, "seconds": p.seconds, "modified": p.modified, "summary": p.summary,
                        "validation": p.validation.as_dict() if p.validation else None} for p in self.passes],
            "weights": [dataclasses.asdict(w) for w in self.weights],
            "validation": self.validation.as_dict() if self.validation else None,
            "notes": self.notes,
            "layer_errors": [dataclasses.asdict(e) for e in self.layer_errors],
        }
