"""The passes, by the name recipes use for them."""
from __future__ import annotations

from onnxcompress.pipeline import Pass

from .prune import PrunePass
from .bitwidth import BitWidthPass
from .calibrate import CalibratePass
from .qdq import QdqPass
from .share import SharePass
from .sparse import SparsePass
from .entropy import EntropyPass

PASSES: dict[str, type[Pass]] = {
    CalibratePass.name: CalibratePass,
    QdqPass.name: QdqPass,
    PrunePass.name: PrunePass,
    SharePass.name: SharePass,
    BitWidthPass.name: BitWidthPass,
    SparsePass.name: SparsePass,
    EntropyPass.name: EntropyPass,
}
