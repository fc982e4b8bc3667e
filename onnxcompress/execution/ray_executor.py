"""Per-weight tasks as Ray tasks, on a local Ray instance or a cluster (``--executor ray``).

Install with ``pip install 'onnxcompress[ray]'``; ray is imported here only, when the executor
first runs a task. Each task is :func:`onnxcompress.execution.parallel.call` on a Ray worker: a weight kept in
an external-data file travels as an :class:`~onnxcompress.graph.external.ArrayRef` (path, offset) and
the worker reads it itself, so the model's folder must be on a filesystem every worker sees at the
same path; with ``shared_files=False`` the driver reads each weight and it goes through Ray's
object store instead. Results come back in task order, as with ``--jobs``, so the output is
byte-identical to ``--jobs 1``.

A task whose worker dies (killed, out of memory, node lost) is run again by Ray, up to
``max_retries`` times; one that still fails stops the run with an error naming the weight, and
the pipeline writes no output. An exception raised by the task's own code is not retried (it
would fail again): it is raised in the driver as it would be with ``--jobs 1``.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from onnxcompress.errors import ExecutorError
from onnxcompress.execution.memory import keep_freed_memory
from onnxcompress.execution.parallel import Lazy, Task, call, task_name

log = logging.getLogger(__name__)


def _call_keeping_memory(fn: Callable, args: tuple, kwargs: dict):
    """A Ray task: parallel.call in a worker that keeps freed memory for its next task (execution.memory)."""
    keep_freed_memory()
    return call(fn, args, kwargs)


class RayExecutor:
    """An onnxcompress.execution.parallel.Executor on Ray. address: a running cluster ("auto", "ray://host:10001",
    ...), or None to start a local instance with `num_cpus` CPUs (default: all), shut down by close()."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 3,
                 shared_files: bool = True):
        self.address, self.num_cpus, self.max_retries, self.shared_files = address, num_cpus, max_retries, shared_files
        self._ray = None
        self._started = False

    def _connect(self):
        if self._ray is not None:
            return self._ray
        try:
            import ray
        except ImportError as e:
            raise ExecutorError("--executor ray needs Ray: pip install 'onnxcompress[ray]'") from e
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ExecutorError(f"cannot start or reach Ray at {self.address or 'a new local instance'}: {e}") from e
            self._started = True
        self._ray = ray
        return ray

    def map(self, fn: Callable, tasks: Iterable[Task], work: int | None = None) -> Iterator:
        ray = self._connect()
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(_call_keeping_memory)
        window = 2 * max(int(ray.cluster_resources().get("CPU", 1)), 1)
        pending: deque = deque()
        try:
            for args, kwargs in tasks:
                if not self.shared_files:  # the driver reads the weight; Ray ships it through its object store
                    args = tuple(a.load() if isinstance(a, Lazy) else a for a in args)
                pending.append((task_name(args), remote.remote(fn, args, kwargs)))
                if len(pending) >= window:
                    yield self._result(*pending.popleft())
            while pending:
                yield self._result(*pending.popleft())
        finally:
            for _, ref in pending:
                ray.cancel(ref, force=True)

    def _result(self, name: str, ref):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the task's own code raised: as it would inline
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from e
            raise ExecutorError(f"the task for weight '{name}' failed on Ray: {e}") from e
        except ray.exceptions.RayError as e:
            raise ExecutorError(f"the task for weight '{name}' kept failing on Ray after {self.max_retries} "
                                f"retries ({type(e).__name__}); no output was written") from e

    def close(self) -> None:
        """Shut down the local Ray instance this executor started (a cluster it joined keeps running)."""
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray, self._started = None, False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
