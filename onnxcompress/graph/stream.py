"""Feeds of a stateful model recorded as a stream: which calls continue each other, and the carrying
of one model's state outputs into its next call.

Graph layer: plain data (found by runtime.streams, held by a Dataset, used by every runner of such data).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Stream:
    """Calls that continue each other: where ``continues[i]``, call i takes each link's state output of
    call i - 1 as that link's state input (links: (input, output) names)."""

    links: tuple[tuple[str, str], ...]
    continues: tuple[bool, ...]

    @property
    def chains(self) -> int:
        """How many streams the calls form (a stream starts where a call does not continue the last)."""
        return sum(1 for c in self.continues if not c)

    def subset(self, pick: slice) -> "Stream | None":
        """The stream of the calls `pick` selects: consecutive calls keep their chains (the first one starts
        a chain); calls picked apart do not continue each other, each runs on the states it was given."""
        if pick.step not in (None, 1):
            return None
        kept = self.continues[pick]
        return Stream(self.links, (False,) + kept[1:]) if any(kept[1:]) else None

    def describe(self) -> str:
        pairs = ", ".join(f"{o} -> {i}" for i, o in self.links[:4]) + (", ..." if len(self.links) > 4 else "")
        return (f"the data is {self.chains} stream(s) of {len(self.continues)} calls (states fed back: {pairs}); "
                "every fidelity figure runs them call by call, each model feeding its own states")


class StateCarry:
    """Carries one model's state outputs to its next call along a :class:`Stream` (none: feeds unchanged)."""

    def __init__(self, stream: Stream | None):
        self.stream = stream
        self.outputs: tuple[str, ...] = tuple(dict.fromkeys(o for _, o in stream.links)) if stream else ()
        self._last: dict[str, np.ndarray] | None = None

    def feed(self, index: int, feed: Feed) -> Feed:
        """Call `index`'s feed with its state inputs replaced by this model's last state outputs, where
        the call continues the last one."""
        if self.stream is None or self._last is None or not self.stream.continues[index]:
            return feed
        out = dict(feed)
        for name, output in self.stream.links:
            given = np.asarray(feed[name])
            out[name] = np.asarray(self._last[output]).astype(given.dtype, copy=False).reshape(given.shape)
        return out

    def keep(self, values: Mapping[str, np.ndarray]) -> None:
        """This call's outputs (at least the state outputs), for the next call."""
        if self.stream is not None:
            self._last = {o: values[o] for o in self.outputs}
