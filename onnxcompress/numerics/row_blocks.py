"""Row blocks of aligned matrices, small ones stacked before they are multiplied.

The statistics of a layer sum products X_b^T Y_b over blocks b of its input rows (Gram matrices, one
block per data chunk). A product writes its K x K result whatever the rows it has, so blocks of a few
rows (a model run per sentence: some 30 rows of a 512-wide input) cost a K x K pass each for little
arithmetic. :class:`RowBlocks` hands blocks of SMALL_BLOCK rows or more to its sink as they come (after
the small ones held so far), and stacks smaller ones until they hold STACK_ROWS rows: data arriving in
large blocks is summed exactly as block by block, small blocks to the same sums up to rounding.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

SMALL_BLOCK = 256  # rows: a block this large is multiplied on its own
STACK_ROWS = 2048  # rows: small blocks are held until they hold this many


class RowBlocks:
    """Blocks of aligned matrices (the same rows of each), given to `sink(*matrices)` stacked when small.

    Call :meth:`flush` before reading what the sink summed.
    """

    def __init__(self, sink: Callable[..., None]):
        self.sink = sink
        self._held: list[tuple[np.ndarray, ...]] = []
        self._rows = 0

    def add(self, *blocks: np.ndarray) -> None:
        rows = blocks[0].shape[0]
        if rows >= SMALL_BLOCK:
            self.flush()
            self.sink(*blocks)
            return
        self._held.append(blocks)
        self._rows += rows
        if self._rows >= STACK_ROWS:
            self.flush()

    def flush(self) -> None:
        """Hand the held small blocks to the sink, stacked."""
        if not self._held:
            return
        held, self._held, self._rows = self._held, [], 0
        self.sink(*(parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in zip(*held)))
