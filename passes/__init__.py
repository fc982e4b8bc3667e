"""The passes, by the name recipes use for them."""
from __future__ import annotations

from onnxcompress.pipeline.manager import Pass

from onnxcompress.passes.prune import PrunePass
from onnxcompress.passes.bitwidth import BitWidthPass
from onnxcompress.passes.calibrate import CalibratePass
from onnxcompress.passes.qdq import QdqPass
from onnxcompress.passes.share import SharePass
from onnxcompress.passes.sparse import SparsePass
from onnxcompress.passes.entropy import EntropyPass

PASSES: dict[str, type[Pass]] = {
    CalibratePass.name: CalibratePass,
    QdqPass.name: QdqPass,
    PrunePass.name: PrunePass,
    SharePass.name: SharePass,
    BitWidthPass.name: BitWidthPass,
    SparsePass.name: SparsePass,
    EntropyPass.name: EntropyPass,
}
