"""onnxruntime sessions for any model we write, and running a Dataset through them."""
from __future__ import annotations

import functools
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.graph import external
from onnxcompress.graph.external import check_model
from onnxcompress.graph.data import Dataset, model_inputs
from onnxcompress.graph.stream import StateCarry
from onnxcompress.errors import ModelError, RuntimeMissingError
from onnxcompress.formats.customop import to_portable
from onnxcompress.graph.edit import DOMAIN, iter_graphs

# the one import of onnxruntime: any of its distributions provides the module (onnxruntime, onnxruntime-gpu,
# -directml, -openvino), so none is a hard dependency (pyproject: the `cpu` extra) and a missing one is named here
def _import_runtime():
    """onnxruntime, imported while TMPDIR names a folder of ours, removed at once: at import its telemetry writes
    a '.ses' file into the temporary folder, which would be left in the user's (nothing of a command may be)."""
    saved = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="onnxcompress-ort-") as private:
        os.environ["TMPDIR"] = private
        try:
            import onnxruntime
        finally:
            if saved is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved
    return onnxruntime


try:
    ort = _import_runtime()
except ImportError as e:
    raise RuntimeMissingError(
        f"onnxruntime cannot be imported ({e}); install a runtime: pip install 'onnxcompress[cpu]' for the CPU one, "
        "or one of onnxruntime-gpu, onnxruntime-directml, onnxruntime-openvino") from e

log = logging.getLogger(__name__)

Outputs = list[np.ndarray]

def uses_domain(model: onnx.ModelProto, domain: str = DOMAIN) -> bool:
    return any(n.domain == domain for g, _ in iter_graphs(model.graph) for n in g.node)


def to_runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with our own domain's constant subgraphs decoded (identity for portable models)."""
    if not uses_domain(model):
        return model
    return to_portable(model)


def foreign_domains(model: onnx.ModelProto) -> set[str]:
    """Custom op domains that stock onnxruntime cannot run (neither standard nor ours)."""
    known = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", DOMAIN}
    local = {(f.domain, f.name) for f in model.functions}  # model-local functions: onnxruntime inlines them
    return {n.domain for g, _ in iter_graphs(model.graph) for n in g.node
            if n.domain not in known and (n.domain, n.op_type) not in local}


# external-data location of the weights a detached model hands to onnxruntime as arrays
IN_MEMORY = "onnxcompress-in-memory"
_DETACHABLE = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.UINT8,
               TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL}


def detached(model: onnx.ModelProto, *, min_bytes: int = 1 << 12, arrays: bool = True, also: Collection[str] = ()
             ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` without the bytes of its large main-graph initializers, and those as arrays.

    The copy refers to each detached weight as external data at IN_MEMORY; give the arrays to
    make_session(..., arrays=...), which hands them to onnxruntime directly. Building a session
    this way never holds a second protobuf copy of the weights nor their serialized bytes (a copy of
    the model with extra outputs for calibration or capture costs its graph, not its weights).
    The initializers named in `also` are detached whatever their size (small integer tensors stay,
    since onnxruntime reads shapes and axes from them while it builds the session). Large initializers no
    node, input or output reads are left out of the copy.
    With arrays=False only the copy is made (shape inference needs the types and dims alone). A
    packed model comes back as it is, with no arrays: make_session decodes it first.
    """
    if uses_domain(model):
        return model, {}
    light = onnx.ModelProto()
    _copy_fields(model, light, skip={"graph"})
    _copy_fields(model.graph, light.graph, skip={"initializer"})
    detached_arrays = {}
    # a weight nothing reads is dropped, not detached: onnxruntime removes it while it loads the graph, and then
    # fails to take its array ('Failed to find existing initializer'); exporters leave such tensors behind
    read = {x for g, _ in iter_graphs(model.graph) for n in g.node for x in n.input} \
        | {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    for tensor in model.graph.initializer:
        if (tensor.data_location == TensorProto.EXTERNAL or tensor.data_type not in _DETACHABLE
                or not tensor.HasField("raw_data") or (len(tensor.raw_data) < min_bytes and tensor.name not in also)):
            light.graph.initializer.append(tensor)
            continue
        if tensor.name not in read:
            continue
        placeholder = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                  data_location=TensorProto.EXTERNAL)
        for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(len(tensor.raw_data)))):
            entry = placeholder.external_data.add()
            entry.key, entry.value = key, value
        light.graph.initializer.append(placeholder)
        if arrays:
            detached_arrays[tensor.name] = numpy_helper.to_array(tensor)
    return light, detached_arrays


def _copy_fields(source, target, *, skip: set[str]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


class _Runs:
    """The runs in progress, stopped when the process is asked to end (:func:`stop_runs_on_signals`)."""

    lock = threading.Lock()
    active: set = set()
    stopping = False

    @classmethod
    def stop(cls) -> None:
        with cls.lock:
            cls.stopping = True
            for options in cls.active:
                options.terminate = True


class _Stoppable:
    """An onnxruntime session whose `run` a signal to end the process stops (:func:`stoppable`); everything else is
    the session's. It holds the session, the session does not hold it: no reference cycle, so a dropped session is
    freed at once, never left to the cyclic collector (a forked worker collecting one it inherited hangs in its
    destructor)."""

    def __init__(self, session: ort.InferenceSession):
        self._session = session

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def run(self, output_names, input_feed, run_options=None):
        options = run_options if run_options is not None else ort.RunOptions()
        with _Runs.lock:
            _Runs.active.add(options)
            options.terminate = _Runs.stopping
        try:
            return self._session.run(output_names, input_feed, options)
        finally:
            with _Runs.lock:
                _Runs.active.discard(options)


def stoppable(session: ort.InferenceSession) -> ort.InferenceSession:
    """The session, its `run` given RunOptions that a signal to end the process sets to terminate: onnxruntime
    holds the main thread in C++ for as long as a run takes (a Loop of 2^62 iterations: for ever), and Python's own
    handlers (KeyboardInterrupt, exit_on_termination's SystemExit) run only once it returns."""
    return _Stoppable(session)


def stop_runs_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP (those with a Python handler) stop the runs in progress, so the handler runs
    at once and the process ends as it would between runs (temporary files removed). Python writes a signal's
    number to the wakeup fd from its C-level handler, whatever the main thread is doing; a daemon thread reading it
    sets the runs' terminate flag. Main thread only; another wakeup fd already set is left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(read), os.close(write)
        return
    if previous != -1:  # someone else's: give it back
        signal.set_wakeup_fd(previous)
        os.close(read), os.close(write)
        return

    def watch():
        while os.read(read, 1):
            _Runs.stop()

    threading.Thread(target=watch, name="onnxcompress-stop-runs", daemon=True).start()


def make_session(model: onnx.ModelProto | str | os.PathLike, *, threads: int | None = None,
                 optimize: bool = True, arrays: dict[str, np.ndarray] | None = None,
                 arena: bool = True) -> ort.InferenceSession:
    """A CPU session (its runs stopped by a signal to end, :func:`stoppable`); packed models are decoded first;
    errors become ModelError. `arrays`: the weights of a model made by :func:`detached`. `arena=False`: no CPU
    memory arena, so a run's buffers go back when it ends (an arena keeps its peak for the session's life: ~80-290
    MB a suffix session of a 22M-weight transformer, none without, at the same CPU time)."""
    return stoppable(_make_session(model, threads=threads, optimize=optimize, arrays=arrays, arena=arena))


def _make_session(model: onnx.ModelProto | str | os.PathLike, *, threads: int | None,
                  optimize: bool, arrays: dict[str, np.ndarray] | None, arena: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions; onnxruntime prints nothing itself
    options.enable_cpu_mem_arena = arena
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = None
    try:
        if arrays:
            # onnxruntime reads these buffers in place for the session's lifetime: they must own their
            # contiguous memory (not views), and the session keeps them alive
            owned = [a if a.flags.owndata and a.flags.c_contiguous else np.array(a, order="C")
                     for a in arrays.values()]
            options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in owned])
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            session.onnxcompress_buffers = owned
            return session
        if isinstance(model, (str, os.PathLike)):
            proto = onnx.load(str(model), load_external_data=False)
            if not uses_domain(proto):
                return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            model = onnx.load(str(model))
        model = to_runnable(model)
        folders = external.folders_in_use(model) if external.has_external(model) else set()
        if len(folders) == 1 and model.ByteSize() < 2**31 - 1:  # a streamed model: data read from its folder
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(folders.pop()))
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        if not folders and model.ByteSize() < 2**31 - 1:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return _session_via_file(model, options)
    except (ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.NotImplemented) as e:
        graph = model if isinstance(model, onnx.ModelProto) else proto
        domains = foreign_domains(graph)
        hint = (f"; it uses custom ops of {sorted(domains)}: register their library to validate" if domains else "")
        raise ModelError(f"onnxruntime cannot load the model: {first_line(e)}{hint}") from e


def _session_via_file(model: onnx.ModelProto, options) -> ort.InferenceSession:
    from onnxcompress.graph.model import save_model

    with tempfile.TemporaryDirectory(prefix="onnxcompress-") as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path, external_data=True)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def first_line(error: BaseException) -> str:
    """The first line of an error's text (onnxruntime's run on for pages), at most 400 characters."""
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__


def run(session: ort.InferenceSession, data: Dataset, model: onnx.ModelProto, *,
        max_batch: int = 64, output_names: Sequence[str] | None = None, progress=None) -> list[Outputs]:
    """Run every feed (batched where allowed; a stream call by call, carrying the model's own states);
    one list of outputs per chunk, in order."""
    specs = model_inputs(model)
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    carry = StateCarry(data.stream)
    fetch = names + [o for o in carry.outputs if o not in names]
    results = []
    for i, (feed, count) in enumerate(data.chunks(specs, max_batch=max_batch)):
        try:
            out = session.run(fetch, carry.feed(i, feed))
        except Exception as e:  # onnxruntime raises its own exception types
            hint = ""
            if data.guessed:  # symbolic dims were guessed: the user must say what they are
                hint = (f" (the symbolic dims of input(s) {data.guessed} were guessed: give their sizes with "
                        f"--shape {data.guessed[0]}=..., or give --data)")
            raise ModelError(f"onnxruntime failed on {data.source}: {first_line(e)}{hint}") from e
        carry.keep(dict(zip(fetch, out)))
        results.append(out[:len(names)])
        if progress is not None:
            progress.update(count)
    return results


def median_latency(session: ort.InferenceSession, feed: dict, repeat: int = 30) -> float:
    """Median seconds of one call, after a warm-up call."""
    session.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check_runnable(model: onnx.ModelProto, what: str) -> None:
    """ModelError (one line) unless onnx's full check (strict shape inference) passes and onnxruntime
    builds a session (decode ops of our domain already gone; not judged with other libraries' ops)."""
    left = [n.op_type for g, _ in iter_graphs(model.graph) for n in g.node if n.domain == DOMAIN]
    if left:
        raise ModelError(f"{what} still holds {len(left)} {DOMAIN} op(s) ({left[0]})")
    foreign = foreign_domains(model)  # ops of other libraries: onnx and onnxruntime cannot judge them
    try:  # the full check includes strict shape inference, as at the end of every compress
        check_model(model, full_check=model.ByteSize() < 2**31 - 1)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{what} is not a valid ONNX model: {first[:300]}") from e
    if foreign:
        return
    try:
        make_session(model)
    except ModelError as e:
        raise ModelError(f"{what} does not load in onnxruntime: {e}") from e


@functools.lru_cache(maxsize=None)
def max_runnable_opset(domain: str = "") -> int:
    """Highest opset of `domain` this onnxruntime accepts, found by loading tiny models."""

    def loads(opset: int) -> bool:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)], ir_version=9)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a refused probe prints nothing
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return True
        except Exception:  # onnxruntime raises its own Fail type
            return False

    latest = onnx.defs.onnx_opset_version() if domain in ("", "ai.onnx") else None
    if latest is not None and loads(latest) and not loads(latest + 1):  # the usual case: two probes, not six
        return latest
    lo, hi = 7, 64
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if loads(mid) else (lo, mid - 1)
    return lo
