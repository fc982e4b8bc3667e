"""Per-weight tasks as Ray tasks, on a local Ray instance or a cluster (``--executor ray``).

Install with ``pip install 'onnxcompress[ray]'``; ray is imported here only, when the executor
starts. Each task is :func:`onnxcompress.execution.parallel.call` on a Ray worker: a weight kept in
an external-data file travels as an :class:`~onnxcompress.graph.external.ArrayRef` (path, offset) and
the worker reads it itself, so the model's folder must be on a filesystem every worker sees at the
same path; with ``shared_files=False`` the driver reads each weight and it goes through Ray's
object store instead. Results come back in task order, as with ``--jobs``, so the output is
byte-identical to ``--jobs 1``; their numpy arrays come out of Ray's object store without a copy.

:meth:`RayExecutor.start` connects in a background thread (a local instance takes seconds to
start) and has the workers import the ``preload`` modules meanwhile, so both overlap the loading
of the model and the passes before the first task. The thread stays until :meth:`RayExecutor.close`:
the processes of a local instance are bound to the thread that started them (Linux ends them when
it exits).

A task whose worker dies (killed, out of memory, node lost) is run again by Ray, up to
``max_retries`` times; one that still fails stops the run with an error naming the weight, and
the pipeline writes no output. An exception raised by the task's own code is not retried (it
would fail again): it is raised in the driver as it would be with ``--jobs 1``.
"""
from __future__ import annotations

import importlib
import logging
import subprocess
import threading
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


def _preload(*modules: str) -> None:
    """A worker's warm-up task: import what its tasks will need (seconds in a fresh worker)."""
    for module in modules:
        importlib.import_module(module)


class _NotTheMainThread(logging.Filter):
    """Drops Ray's warning that ray.init outside the main thread leaves SIGTERM alone: what we want (the CLI's own
    handler unwinds and removes temporary outputs; Ray's would exit at once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class RayExecutor:
    """An onnxcompress.execution.parallel.Executor on Ray. address: a running cluster ("auto", "ray://host:10001",
    ...), or None to start a local instance with `num_cpus` CPUs (default: all), shut down by close(). preload:
    modules each worker imports before its first task (see start())."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 3,
                 shared_files: bool = True, preload: tuple[str, ...] = ()):
        self.address, self.num_cpus, self.max_retries, self.shared_files = address, num_cpus, max_retries, shared_files
        self.preload = preload
        self._ray = self._remote = self._thread = self._error = None
        self._started = False
        self._ready, self._done = threading.Event(), threading.Event()

    def start(self) -> RayExecutor:
        """Connect (start the local instance) and warm the workers in a background thread; map() waits for it."""
        if self._thread is None and self._ray is None:
            self._thread = threading.Thread(target=self._serve, name="onnxcompress-ray", daemon=True)
            self._thread.start()
        return self

    def _serve(self) -> None:
        """The background thread: connect, then stay until close() (a local instance's processes end with it)."""
        try:
            self._connect_now()
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for the connection
            self._error = e
        self._ready.set()
        self._done.wait()

    def _connect(self):
        if self._thread is not None:
            self._ready.wait()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        if self._ray is None:
            self._connect_now()
        return self._ray

    def _connect_now(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise ExecutorError("--executor ray needs Ray: pip install 'onnxcompress[ray]'") from e
        if not ray.is_initialized():
            quiet = _NotTheMainThread()
            logging.getLogger("ray._private.worker").addFilter(quiet)
            try:
                ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ExecutorError(f"cannot start or reach Ray at {self.address or 'a new local instance'}: {e}") from e
            finally:
                logging.getLogger("ray._private.worker").removeFilter(quiet)
            self._started = True
        self._remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(_call_keeping_memory)
        self._ray = ray
        if self.preload:  # one warm-up task per CPU, not awaited: the first tasks queue behind them
            for _ in range(self._cpus()):
                self._remote.remote(_preload, self.preload, {})

    def _cpus(self) -> int:
        return max(int(self._ray.cluster_resources().get("CPU", 1)), 1)

    def map(self, fn: Callable, tasks: Iterable[Task], work: int | None = None) -> Iterator:
        ray = self._connect()
        window = 2 * self._cpus()
        pending: deque = deque()
        try:
            for args, kwargs in tasks:
                if not self.shared_files:  # the driver reads the weight; Ray ships it through its object store
                    args = tuple(a.load() if isinstance(a, Lazy) else a for a in args)
                pending.append((task_name(args), self._remote.remote(fn, args, kwargs)))
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
        """Shut down the local Ray instance this executor started (a cluster it joined keeps running); waits for a
        start in progress first."""
        if self._thread is not None:
            self._ready.wait()
        if self._ray is not None and self._started:
            _end_autoscaler(self._ray)
            self._ray.shutdown()
        if self._thread is not None:
            self._done.set()
            self._thread.join()
        self._ray = self._remote = self._thread = self._error = None
        self._started = False
        self._ready.clear()
        self._done.clear()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _end_autoscaler(ray) -> None:
    """Kill the local instance's autoscaler monitor (of no use on a fixed local instance) before ray.shutdown():
    shutdown stops the GCS first, and the monitor answers its SIGTERM by reporting to the GCS, so it waits out its
    whole second of grace (1.0 of shutdown's 1.4 s, measured). Uses Ray's internals (ray._private): where they
    differ, nothing is done and shutdown takes its usual time."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    processes = getattr(node, "all_processes", None)
    if not isinstance(processes, dict):
        return
    for info in processes.get("monitor", ()):
        process = getattr(info, "process", None)
        if isinstance(process, subprocess.Popen) and process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                log.debug("Ray's autoscaler monitor did not end at once; ray.shutdown() will")
