"""A model whose run never ends: a signal still ends our process at once, leaving nothing behind."""
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, TensorProto


def _endless(path):
    """x -> MatMul(W) -> a Loop of 2^62 iterations adding 1 (onnxruntime runs it for ever)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["v", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 64])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Loop", ["trips", "go", "h"], ["y"], body=body)],
        "endless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array(2**62, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go"),
         numpy_helper.from_array(np.ones((1, 64), np.float32), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


_CHILD = """
import sys
import onnxruntime
from onnxcompress.cli import main

plain = onnxruntime.InferenceSession.run


def run(self, *args, **kwargs):  # says when onnxruntime has the main thread
    print("running", file=sys.stderr, flush=True)
    return plain(self, *args, **kwargs)


onnxruntime.InferenceSession.run = run
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_a_run_that_never_returns(tmp_path, signum):
    _endless(tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, "compress", str(tmp_path / "m.onnx"), "-o",
                              str(tmp_path / "out" / "o.onnx"), "--recipe", "share", "--jobs", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr.readline().strip() == "running"
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        assert child.poll() is None  # still in the loop
        child.send_signal(getattr(signal, signum))
        code = child.wait(timeout=30)  # before: not at all, until the run returned (never)
    finally:
        child.kill()
        child.wait()
    assert code == 128 + getattr(signal, signum), child.stderr.read()
    assert list((tmp_path / "out").iterdir()) == []


def test_importing_onnxruntime_leaves_nothing_in_tmpdir(tmp_path):
    """onnxruntime's telemetry writes '.ses' into TMPDIR when imported: every command left it in the user's
    temporary folder. It is imported with TMPDIR pointing at a folder of ours, removed at once."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "tmp"
    folder.mkdir()
    subprocess.run([sys.executable, "-c", "import onnxcompress.runtime.sessions"], check=True,
                   env=dict(os.environ, TMPDIR=str(folder)))
    assert list(folder.iterdir()) == []
