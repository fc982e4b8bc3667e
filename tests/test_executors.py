"""Executors for per-weight work (onnxcompress.execution.parallel, onnxcompress.execution.ray_executor): same results in
the same order whatever runs them; external weights read where the task runs; Ray tasks whose worker
dies are retried, and one that keeps dying stops the run naming its weight, with no output written.

The Ray tests start a local Ray instance (slow: run with --runslow) and skip when ray is missing.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.graph import external, spill

from onnxcompress.graph import model as model_io

from onnxcompress.execution import parallel
from onnxcompress.api import compress_file
from onnxcompress.errors import ExecutorError, ModelError
from onnxcompress.graph.external import ArrayRef
from onnxcompress.graph.edit import all_tensors
from onnxcompress.graph.model import load_model, save_model
from onnxcompress.graph.weights import find_weights, get_array, weight_source
from tiny import mlp, make_model, random_feeds, run, value


@pytest.fixture
def streaming(monkeypatch):
    monkeypatch.setattr(model_io, "STREAM_THRESHOLD", 0)
    monkeypatch.setattr(spill, "SPILL_MIN_BYTES", 1024)


def _digest(path: Path) -> str:
    """The output model and its external data, the data file's name blanked (it is named per output)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "data"
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    data = path.with_name(path.name + ".data")
    if data.exists():
        h.update(data.read_bytes())
    return h.hexdigest()


class Recording:
    """An executor that runs tasks inline and keeps what each task was given."""

    def __init__(self):
        self.args = []

    def map(self, fn, tasks, work=None):
        for args, kwargs in tasks:
            self.args.append(args)
            yield parallel.call(fn, args, kwargs)


def _square(n):
    return n * n


def _total(array):
    return float(np.sum(array))


def _fail_on_three(n):
    if n == 3:
        raise ModelError("bad 3")
    return n


def test_executors_keep_order_and_raise_task_errors(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 0)
    tasks = [((n,), {}) for n in range(7)]
    for jobs in (1, 2, parallel.Serial(), parallel.Processes(2), Recording()):
        assert list(parallel.map_ordered(_square, tasks, jobs=jobs)) == [n * n for n in range(7)]
        with pytest.raises(ModelError, match="bad 3"):
            list(parallel.map_ordered(_fail_on_three, tasks, jobs=jobs))
    assert isinstance(parallel.executor_for(1), parallel.Serial)
    assert isinstance(parallel.executor_for(3), parallel.Processes)


def test_lazy_weights_are_read_where_the_task_runs(tmp_path, streaming, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 0)
    save_model(mlp(), tmp_path / "m.onnx", external_data=True)
    streamed = load_model(tmp_path / "m.onnx")
    infos = find_weights(streamed)
    refs = [weight_source(streamed, info) for info in infos]
    assert all(isinstance(r, ArrayRef) for r in refs)
    assert all(len(repr(r)) < 300 for r in refs)  # a few bytes travel, not the weight
    expected = [float(np.sum(get_array(streamed, info))) for info in infos]
    for jobs in (1, 2):
        assert list(parallel.map_ordered(_total, [((r,), {}) for r in refs], jobs=jobs)) == expected
    # an in-memory model's weights are passed as arrays
    assert isinstance(weight_source(mlp(), find_weights(mlp())[0]), np.ndarray)
    assert parallel.task_name((refs[0], infos[0], 5)) == infos[0].name


def test_array_ref_fails_cleanly_on_a_shortened_file(tmp_path, streaming):
    save_model(mlp(), tmp_path / "m.onnx", external_data=True)
    streamed = load_model(tmp_path / "m.onnx")
    ref = weight_source(streamed, find_weights(streamed)[-1])
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:ref.offset + 8])
    with pytest.raises(ModelError, match="shorter"):
        ref.load()


def test_share_on_any_executor_gives_identical_files(tmp_path, streaming, monkeypatch):
    """End to end: the same output bytes serially, in processes and on an executor given external
    weights by reference; the output runs in onnxruntime close to the original."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 0)
    model = mlp(layers=4, width=64)
    save_model(model, tmp_path / "m.onnx", external_data=True)
    recording = Recording()
    digests = []
    for name, jobs in (("one", 1), ("two", 2), ("rec", recording)):
        compress_file(tmp_path / "m.onnx", tmp_path / f"{name}.onnx", "share", validate="none", jobs=jobs)
        digests.append(_digest(tmp_path / f"{name}.onnx"))
    assert digests[0] == digests[1] == digests[2]
    assert recording.args and all(isinstance(args[0], ArrayRef) for args in recording.args)
    feeds = {"x": random_feeds(model)["x"]}
    out = run(onnx.load(str(tmp_path / "one.onnx")), feeds)[0]
    ref = run(model, feeds)[0]
    assert float(np.sum((out - ref) ** 2) / np.sum(ref ** 2)) < 0.05


def test_ray_executor_without_ray_is_a_clean_error(monkeypatch):
    from onnxcompress.execution.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ExecutorError, match="pip install"):
        list(RayExecutor().map(_square, [((2,), {})]))


# ----------------------------------------------------------------------------- Ray (slow)

def _die_once(n, marker):
    """Kills its worker the first time it runs for n == 2 (the marker file remembers), then works."""
    if n == 2 and not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(1)
    return n * n


def _always_die(*args, **kwargs):
    os._exit(1)


class _Named:
    def __init__(self, name):
        self.name = name


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_identical_files_and_retries_killed_workers(tmp_path, streaming, local_ray):
    from onnxcompress.execution.ray_executor import RayExecutor

    model = mlp(layers=4, width=64)
    save_model(model, tmp_path / "m.onnx", external_data=True)
    compress_file(tmp_path / "m.onnx", tmp_path / "one.onnx", "share", validate="none", jobs=1)
    for shared_files in (True, False):
        out = tmp_path / f"ray_{shared_files}.onnx"
        compress_file(tmp_path / "m.onnx", out, "share", validate="none",
                      jobs=RayExecutor(shared_files=shared_files))
        assert _digest(out) == _digest(tmp_path / "one.onnx")
    marker = tmp_path / "died"
    tasks = [((n, str(marker)), {}) for n in range(5)]
    assert list(RayExecutor(max_retries=2).map(_die_once, tasks)) == [n * n for n in range(5)]
    assert marker.read_text() == "died"  # the task ran, killed its worker, and was run again
    with pytest.raises(ExecutorError, match="weight 'W7'.*after 1 retries"):
        list(RayExecutor(max_retries=1).map(_always_die, [((_Named("W7"),), {})]))
    with pytest.raises(ModelError, match="bad 3"):  # the task's own error, raised as inline, not retried
        list(RayExecutor().map(_fail_on_three, [((n,), {}) for n in range(5)]))


@pytest.mark.slow
def test_ray_run_that_keeps_failing_writes_nothing(tmp_path, streaming, local_ray, monkeypatch):
    from onnxcompress.passes import share as share_module
    from onnxcompress.execution.ray_executor import RayExecutor

    save_model(mlp(layers=2, width=64), tmp_path / "m.onnx", external_data=True)
    monkeypatch.setattr(share_module, "share_weight", _always_die)
    with pytest.raises(Exception, match="W0"):
        compress_file(tmp_path / "m.onnx", tmp_path / "out.onnx", "share", validate="none",
                      jobs=RayExecutor(max_retries=0))
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.data").exists()


_FREED = r"""
import ctypes, sys
import numpy as np
if sys.argv[1] == "keep":
    from onnxcompress.execution.memory import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # once, then the same answer
class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
buffer = np.ones(64 << 20, np.uint8)  # a weight's buffer, freed
del buffer
print(libc.mallinfo2().fordblks >> 20)  # MB free in the heap, kept for the next one
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("ONNXCOMPRESS_NO_GLIBC"),
                    reason="glibc's malloc only")
def test_workers_keep_a_freed_buffer_for_the_next_weight():
    """keep_freed_memory: a freed 64 MB buffer stays in the heap (reused by the next task, not faulted in again);
    without it glibc unmaps it."""
    import subprocess

    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    free = {mode: int(subprocess.run([sys.executable, "-c", _FREED, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("keep", "default")}
    assert free["keep"] >= 64 > free["default"], free


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]


def test_a_task_runs_on_one_blas_thread_and_the_caller_keeps_its_own():
    pytest.importorskip("threadpoolctl")
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS library found by threadpoolctl")
    inside = list(parallel.map_ordered(_blas_threads, [((), {})], jobs=1))[0]
    assert inside and all(n == 1 for n in inside)
    assert _blas_threads() == before


def _collected(i):
    import gc
    gc.collect()
    return i


def test_workers_never_collect_an_onnxruntime_session_left_in_a_cycle_by_the_parent():
    """A session waiting in a reference cycle when the pool forks: a worker's collector would destroy it there and
    hang on thread-pool state the fork did not copy; the workers leave what they inherited alone."""
    import gc
    import subprocess
    script = f"""
import gc, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import numpy as np
from tiny import mlp, random_feeds
from onnxcompress.runtime.sessions import make_session
from onnxcompress.execution.parallel import map_ordered
from test_executors import _collected
gc.disable()
model = mlp()
session = make_session(model)
session.run(None, random_feeds(model, n=2))
session.itself = session  # a cycle (a user's, a cache's): only the collector frees it
del session
print(list(map_ordered(_collected, [((i,), {{}}) for i in range(4)], jobs=2, work=10 ** 7)))
"""
    import signal
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # a hung worker goes with its group
    try:
        out, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail("a worker hung collecting what it inherited")
    assert child.returncode == 0, err[-2000:]
    assert out.strip() == "[0, 1, 2, 3]"
    gc.collect()


def test_a_made_session_is_freed_when_dropped_not_left_to_the_collector():
    """make_session's stoppable session holds the onnxruntime session, not the other way round: no cycle, so the
    session goes as soon as it is dropped (before, its `run` closure held it in a cycle, which only the cyclic
    collector frees: a forked worker must not run it)."""
    import gc
    import weakref

    from tiny import mlp, random_feeds
    from onnxcompress.runtime.sessions import make_session

    model = mlp()
    enabled = gc.isenabled()
    gc.disable()
    try:
        session = make_session(model)
        session.run(None, random_feeds(model, n=2))
        gone = weakref.ref(session)
        del session
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
