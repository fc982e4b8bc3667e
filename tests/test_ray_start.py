"""A local Ray instance started by the executor itself, as `--executor ray` does: in the background (map waits for
it), its workers warmed by `preload`, shut down by close() with none of its processes left behind: after a run,
after Ctrl-C and after a failing task. Slow (each test starts Ray: run with --runslow); skipped without ray.

Its own module: tests/test_executors.py's Ray tests share one instance started by their fixture, and the executor
starts none while one runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnxcompress.errors import ExecutorError
from onnxcompress.graph.model import save_model
from tiny import mlp

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    """Live processes descended from `pid` (Ray's daemons are the driver's children, its workers the raylet's)."""
    found, stack = set(), [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            stack.extend(children - found)
            found |= children
    return {p for p in found if _alive(p)}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ray_processes() -> set[int]:
    """Live processes of any Ray instance on this machine (raylet, GCS, workers, agents)."""
    mine = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if (b"ray::" in cmd or b"/ray/" in cmd) and _alive(int(proc.name)):
            mine.add(int(proc.name))
    return mine


def _square(n):
    return n * n


def _fails_on(n, bad):
    if n == bad:
        raise ValueError(f"bad {n}")
    return n


@pytest.fixture
def ray_module():
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    assert not ray.is_initialized()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test file
    return ray


def test_started_in_the_background_warmed_and_gone_after_close(ray_module):
    from onnxcompress.execution.ray_executor import RayExecutor

    executor = RayExecutor(num_cpus=2, preload=("onnxcompress.passes",)).start()
    assert executor._thread.is_alive()  # connecting while this thread goes on
    try:
        assert list(executor.map(_square, [((n,), {}) for n in range(6)])) == [n * n for n in range(6)]
        assert ray_module.is_initialized() and len(_descendants(os.getpid())) >= 3  # GCS, raylet, workers
        # a failing task stops the map with its error; the instance stays usable until close()
        with pytest.raises(ValueError, match="bad 2"):
            list(executor.map(_fails_on, [((n, 2), {}) for n in range(5)]))
        assert list(executor.map(_square, [((3,), {})])) == [9]
    finally:
        executor.close()
    assert not ray_module.is_initialized()
    assert not _descendants(os.getpid())
    executor.close()  # twice is harmless


def test_start_without_ray_fails_in_map_and_closes(monkeypatch):
    from onnxcompress.execution.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, in the starting thread too
    executor = RayExecutor().start()
    with pytest.raises(ExecutorError, match="pip install"):
        list(executor.map(_square, [((2,), {})]))
    executor.close()
    assert executor._thread is None


_CLI = [sys.executable, "-m", "onnxcompress.cli", "compress"]


def test_cli_ray_run_matches_jobs_1_and_leaves_no_process(tmp_path, ray_module):
    save_model(mlp(layers=3, width=64), tmp_path / "m.onnx")
    before = _ray_processes()
    for name, extra in (("one", ["--jobs", "1"]), ("ray", ["--jobs", "2", "--executor", "ray"])):
        subprocess.run(_CLI + [str(tmp_path / "m.onnx"), "-o", str(tmp_path / f"{name}.onnx"), "--recipe", "share",
                               "--validate", "none", "-q"] + extra, check=True, capture_output=True, timeout=600)
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "ray.onnx").read_bytes()
    assert not _ray_processes() - before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_ray_run_stopped_by_a_signal_leaves_no_process_and_no_output(tmp_path, ray_module, signum):
    save_model(mlp(layers=3, width=64), tmp_path / "m.onnx")
    before = _ray_processes()
    child = subprocess.Popen(_CLI + [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--recipe", "share",
                                     "--validate", "none", "-q", "--executor", "ray", "--jobs", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes() for p in _descendants(child.pid)
                      if Path(f"/proc/{p}/cmdline").exists()):
            assert child.poll() is None and time.monotonic() < deadline, "Ray's raylet never started"
            time.sleep(0.05)
        child.send_signal(signum)
        err = child.communicate(timeout=300)[1]
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum, err  # Ctrl-C: "interrupted"; SIGTERM unwinds as SystemExit(143)
    assert not (tmp_path / "out.onnx").exists()
    assert not _ray_processes() - before
