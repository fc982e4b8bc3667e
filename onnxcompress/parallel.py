"""Independent per-weight work in worker processes, with results identical to running it inline.

``map_ordered(fn, tasks, jobs=...)`` calls ``fn(*args, **kwargs)`` for each task and yields the
results in task order. With ``jobs > 1`` the calls run in a pool of forked processes where the
platform forks (so scripts need no ``if __name__ == "__main__"`` guard, which spawn would
require), spawned ones elsewhere. Worker functions must be module-level, take picklable
arguments, and be pure numpy: a forked child must not use onnxruntime, whose thread pools do
not survive a fork. Tasks are taken lazily, at most ``2 * jobs`` ahead, so a
streamed model never has more than a few weights in memory at once. Workers compute with the
same code on the same inputs, so results are bit-identical to ``jobs=1``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

# below this many weight elements in total, starting workers costs more than it saves
MIN_PARALLEL_ELEMENTS = 1_000_000

Task = tuple[tuple, dict[str, Any]]


def available_cores() -> int:
    """Cores this process may run on (the CLI's default --jobs)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def effective_jobs(jobs: int, work: int | None = None) -> int:
    """`jobs`, or 1 when the total work (elements) is too small to pay for worker start-up."""
    if jobs <= 1 or (work is not None and work < MIN_PARALLEL_ELEMENTS):
        return 1
    return jobs


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def map_ordered(fn: Callable, tasks: Iterable[Task], *, jobs: int = 1, work: int | None = None) -> Iterator:
    """Yield fn(*args, **kwargs) for each (args, kwargs) task, in order; in `jobs` processes when > 1."""
    jobs = effective_jobs(jobs, work)
    if jobs == 1:
        for args, kwargs in tasks:
            yield fn(*args, **kwargs)
        return
    log.debug("running %s in %d worker processes", getattr(fn, "__name__", fn), jobs)
    window = 2 * jobs
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_context()) as pool:
        pending: deque = deque()
        try:
            for args, kwargs in tasks:
                pending.append(pool.submit(fn, *args, **kwargs))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
