"""The passes, by the name recipes use for them."""
from __future__ import annotations

from onnxcompress.pipeline import Pass

from .prune import PrunePass
from .share import SharePass

PASSES: dict[str, type[Pass]] = {
    PrunePass.name: PrunePass,
    SharePass.name: SharePass,
}
