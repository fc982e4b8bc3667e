"""Independent per-weight work on an executor, with results identical to running it inline.

``map_ordered(fn, tasks, jobs=...)`` calls ``fn(*args, **kwargs)`` for each task and yields the
results in task order. ``jobs`` is a core count or an :class:`Executor`:

- :class:`Serial` (``jobs=1``): in this process.
- :class:`Processes` (``jobs > 1``): a pool of forked processes where the platform forks (so
  scripts need no ``if __name__ == "__main__"`` guard, which spawn would require), spawned ones
  elsewhere. Worker functions must be module-level, take picklable arguments, and be pure numpy:
  a forked child must not use onnxruntime, whose thread pools do not survive a fork.
- ``onnxcompress.execution.ray_executor.RayExecutor``: Ray tasks on a local or remote Ray cluster
  (``pip install onnxcompress[ray]``; ray is imported there only).

A positional argument that is :class:`Lazy` (a weight in an external-data file, by path and
offset) is loaded where the task runs, so a worker reads its own weight and the driver sends a
few bytes. Tasks are taken lazily, a bounded window ahead, so a streamed model never has more
than a few weights in memory at once. Workers compute with the same code on the same inputs, so
results are bit-identical whatever the executor.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

from onnxcompress.execution.memory import keep_freed_memory
from onnxcompress.numerics.blas import one_blas_thread

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


class Lazy:
    """Base of task arguments loaded where the task runs (e.g. onnxcompress.graph.external.ArrayRef)."""

    def load(self) -> Any:
        raise NotImplementedError


def call(fn: Callable, args: tuple, kwargs: dict[str, Any]):
    """fn(*args, **kwargs) with each Lazy positional argument loaded first, on one BLAS thread (tasks run side by
    side; within one, BLAS threads cost more than they give): what every executor runs."""
    with one_blas_thread():
        return fn(*(a.load() if isinstance(a, Lazy) else a for a in args), **kwargs)


def task_name(args: tuple) -> str:
    """What a task works on, for messages: the `name` of its first argument that has a string one."""
    return next((a.name for a in args if isinstance(getattr(a, "name", None), str)), "a weight")


class Executor(Protocol):
    """Runs independent tasks and yields their results in task order."""

    def map(self, fn: Callable, tasks: Iterable[Task], work: int | None = None) -> Iterator: ...


class Serial:
    """Every task in this process, in order."""

    def map(self, fn: Callable, tasks: Iterable[Task], work: int | None = None) -> Iterator:
        for args, kwargs in tasks:
            yield call(fn, args, kwargs)


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _worker_start() -> None:
    """A worker's first step: what it inherited from the parent goes out of the cyclic collector's reach (a forked
    child that collects an onnxruntime session left in a reference cycle in the parent hangs in its destructor, on
    thread-pool state the fork did not copy: it hung the khmersm `share` run), then keep_freed_memory."""
    gc.freeze()
    keep_freed_memory()


class Processes:
    """`jobs` worker processes on this machine; inline when the work is too small to pay for them."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def map(self, fn: Callable, tasks: Iterable[Task], work: int | None = None) -> Iterator:
        jobs = effective_jobs(self.jobs, work)
        if jobs == 1:
            yield from Serial().map(fn, tasks)
            return
        log.debug("running %s in %d worker processes", getattr(fn, "__name__", fn), jobs)
        window = 2 * jobs
        with ProcessPoolExecutor(max_workers=jobs, mp_context=_context(), initializer=_worker_start) as pool:
            pending: deque = deque()
            try:
                for args, kwargs in tasks:
                    pending.append(pool.submit(call, fn, args, kwargs))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()


def executor_for(jobs: int | Executor) -> Executor:
    """The executor a `jobs` setting stands for: Serial for 1, Processes for more, an Executor as is."""
    if isinstance(jobs, int):
        return Serial() if jobs <= 1 else Processes(jobs)
    return jobs


def map_ordered(fn: Callable, tasks: Iterable[Task], *, jobs: int | Executor = 1, work: int | None = None
                ) -> Iterator:
    """Yield fn(*args, **kwargs) for each (args, kwargs) task, in order, on the executor `jobs` stands for."""
    return executor_for(jobs).map(fn, tasks, work)
