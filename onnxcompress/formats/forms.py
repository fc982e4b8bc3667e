"""The output forms (pipeline layer; no dependencies, so the CLI and recipe listing import it cheaply)."""
from __future__ import annotations

import enum


class Form(str, enum.Enum):
    """How compressed weights are written: standard ONNX ops only, or our custom ops' smallest file."""

    PORTABLE = "portable"
    PACKED = "packed"

    def __str__(self) -> str:
        return self.value
