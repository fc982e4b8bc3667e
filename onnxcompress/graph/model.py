"""Loading and saving models: external data, the 2 GB limit, atomic writes, opset checks.

The input file is only ever read. Every write goes to a temporary file in the destination
folder and is renamed into place once complete, so a failure never leaves a partial output.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxcompress.graph import datafile, external, functions
from onnxcompress.graph.sparse_tensors import densify_sparse_initializers
from onnxcompress.graph.edit import all_tensors, iter_graphs, shadowing_initializers
from onnxcompress.errors import ModelError, OutputError
from onnxcompress.graph.outputs import OutputPlan, Role

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# models whose tensors add up to more than this are written with external data
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# models with more external data than this are streamed: weights read from disk one at a time
STREAM_THRESHOLD = 256 * 1024 * 1024


def load_model(path: str | os.PathLike, *, load_external_data: bool = True,
               stream: bool | None = None, max_opset: int | None = None) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, or raise ModelError with a sentence.

    max_opset: the highest ONNX opset accepted (the runtime's: onnxcompress.runtime.sessions.max_runnable_opset);
    None accepts any opset from MIN_OPSET on.

    stream: keep external data on disk and read each tensor when a pass asks for it
    (onnxcompress.graph.external); None streams when the external data exceeds STREAM_THRESHOLD.
    """
    path = checked_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelError(f"'{path}' is not a readable ONNX model (corrupt or truncated file?): {e}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"'{path}' is not an ONNX model: it holds no graph (corrupt, truncated or not ONNX)")
    external.strip_foreign_bookkeeping(model, str(path))
    functions.inline_functions(model, f"'{path}'")  # first: the tensors of function bodies are checked as the graph's
    if load_external_data:
        check_external_data(model, path.parent)
        files = external_data_files(model)
        if stream is None:
            stream = sum(files.values()) > STREAM_THRESHOLD
        if stream and files:
            external.attach_dirs(model, {location: path.parent for location in files})
    if load_external_data and not (stream and files):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise ModelError(f"cannot read external data of '{path}': {e}") from e
    check_opset(model, str(path), max_opset)
    _normalize(model, f"'{path}'", max_opset)
    _check_structure(model, path)
    return model


def checked_model(model: onnx.ModelProto, *, max_opset: int | None = None) -> onnx.ModelProto:
    """An in-memory model (the Python API's) checked as load_model checks a file: the model itself, or a
    copy rewritten as load_model rewrites (model-local functions inlined, segments dropped, sparse initializers
    dense, output shapes filled); ModelError for what load_model refuses."""
    check_opset(model, "the model", max_opset)
    graphs = [g for g, _ in iter_graphs(model.graph)]
    if (model.functions or model.training_info or _lacks_onnx_domain(model)
            or any(t.HasField("segment") for t in all_tensors(model)) or any(g.sparse_initializer for g in graphs)
            or any(a.name == "sparse_value" for g in graphs for n in g.node for a in n.attribute)
            or external.unranked_values(model.graph) or any(not v.type.WhichOneof("value") for v in model.graph.output)
            or next(shadowing_initializers(model.graph), None)):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
        _normalize(model, "the model", max_opset)
    _check_structure(model, "the model")
    return model


def _lacks_onnx_domain(model: onnx.ModelProto) -> bool:
    """Whether the model imports opsets, none of them the ONNX domain's (onnxruntime then reads it at its latest;
    a model importing no opset at all it refuses)."""
    return bool(model.opset_import) and not opset_of(model)


def _normalize(model: onnx.ModelProto, where: str, max_opset: int | None) -> None:
    """What onnxruntime does at load and onnx cannot read, done once here: the ONNX domain imported at the
    runtime's latest opset (`max_opset`, else onnx's) when the model imports others but not it, model-local functions inlined
    (their weights are then the graph's), training_info left out, a tensor's `segment` fields (a piece of a tensor split across messages,
    which onnxruntime ignores) dropped, sparse initializers stored dense, the types and shapes of graph outputs
    that declare none filled in."""
    if _lacks_onnx_domain(model):
        version = max_opset or onnx.defs.onnx_opset_version()
        model.opset_import.append(onnx.helper.make_opsetid("", version))
        log.info("%s imports no ONNX opset; reading it at opset %d, as onnxruntime does (its latest)", where, version)
    if model.training_info:  # its bindings name weights the passes replace, and onnxruntime ignores it
        log.warning("%s: its training_info (%d training algorithms) is left out of the compressed model, which is "
                    "for inference", where, len(model.training_info))
        model.ClearField("training_info")
    functions.inline_functions(model, where)
    for tensor in all_tensors(model):
        if tensor.HasField("segment"):
            log.info("tensor %r: ignored its segment fields (onnxruntime ignores them too)", tensor.name[:200])
            tensor.ClearField("segment")
    densify_sparse_initializers(model)
    _drop_copies_of_outer_initializers(model)
    _fill_output_shapes(model)


def checked_model_file(path: str | os.PathLike) -> Path:
    """`path` if it is a non-empty regular file, else ModelError (a folder, a FIFO or a device such as
    /dev/zero would block or fill memory when read)."""
    path = Path(path)
    try:
        exists = path.exists()
        if exists and path.is_dir():
            raise ModelError(f"'{path}' is a folder, not an ONNX model file")
        if exists and not path.is_file():
            raise ModelError(f"model file '{path}' is not a regular file (a FIFO, socket or device?)")
        size = path.stat().st_size if exists else 0
    except OSError as e:  # a name too long, a loop of links, no permission
        raise ModelError(f"cannot read model file '{path}': {e.strerror or e}") from e
    if not exists:
        raise ModelError(f"model file '{path}' does not exist")
    if size == 0:
        raise ModelError(f"model file '{path}' is empty")
    return path


def _drop_copies_of_outer_initializers(model: onnx.ModelProto) -> None:
    """A subgraph initializer equal to the enclosing graph's of its name (an exporter's copy) is dropped: reads
    get the same values, and the name is assigned once, as ONNX requires (a different one is refused)."""
    copies = [(graph, tensor) for graph, tensor, outer in shadowing_initializers(model.graph)
              if outer is not None and outer.SerializeToString() == tensor.SerializeToString()]
    for graph, tensor in copies:
        graph.initializer.remove(tensor)
    if copies:
        log.info("%d subgraph initializers dropped: copies of the enclosing graph's of their names", len(copies))


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Graph outputs that declare a type but no shape, or no type at all (onnxruntime runs them, onnx's checker
    refuses them) get the type and shape onnx's inference finds; one it cannot find (an input of unknown rank
    before it) is left so (external.check_model checks such a model without its shapes)."""
    untyped = [v for v in model.graph.output if v.type.WhichOneof("value") is None]
    missing = [v for v in model.graph.output if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
    if not missing and not untyped:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < PROTOBUF_LIMIT else model
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError):
        inferred = model
    types = {v.name: v.type for v in inferred.graph.output if v.type.WhichOneof("value") is not None}
    types.update((v.name, v.type) for v in inferred.graph.value_info if v.type.WhichOneof("value") is not None)
    for value in untyped:
        if value.name in types:
            value.type.CopyFrom(types[value.name])
            log.info("graph output '%s' declared no type; using the inferred one", value.name[:200])
    found = {v.name: v for v in inferred.graph.output if v.type.tensor_type.HasField("shape")}
    for value in missing:
        if value.name not in found:  # onnxruntime runs it so (its rank is known at run time): kept as it is
            log.info("graph output '%s' declares no shape and onnx's shape inference finds none", value.name)
            continue
        value.type.tensor_type.shape.CopyFrom(found[value.name].type.tensor_type.shape)
        log.info("graph output '%s' declared no shape; using the inferred %s", value.name,
                 [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim])


def _check_structure(model: onnx.ModelProto, path: Path) -> None:
    """A truncated protobuf often still parses; the checker catches the dangling pieces."""
    try:
        external.check_model(model, full_check=False) if model.ByteSize() < PROTOBUF_LIMIT else None
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid graph"
        raise ModelError(f"'{path}' is not a valid ONNX model (truncated or corrupt?): {first}") from e
    for graph, tensor, _ in shadowing_initializers(model.graph):
        raise ModelError(f"'{path}': the subgraph {graph.name[:200]!r} has an initializer named {tensor.name[:200]!r}, "
                         "as a different value of an enclosing graph (ONNX names are assigned once; onnxruntime reads "
                         "one or the other depending on its optimization level): rename it")
    for graph, where in iter_graphs(model.graph):
        seen: set[str] = set()
        twice = next((n.name for n in graph.node if n.name and (n.name in seen or seen.add(n.name))), None)
        if twice is not None:
            raise ModelError(f"'{path}': two nodes of {where} are named {twice[:200]!r} (onnxruntime refuses "
                             "such a model; node names are unique in a graph)")
    for tensor in all_tensors(model):
        check_tensor(tensor, f"'{path}'")


_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def check_tensor(tensor: onnx.TensorProto, where: str = "the model") -> None:
    """ModelError unless a tensor's element type is one ONNX defines and its data (inline, or the external
    length it declares) holds exactly the elements its dims declare, as onnxruntime requires at load (onnx's
    checker lets a longer raw_data and an unknown type pass)."""
    name = repr(tensor.name[:200])
    if tensor.data_type not in _KNOWN_TYPES:
        raise ModelError(f"{where}: tensor {name} has element type {tensor.data_type}, which ONNX does not define")
    expected = external.data_bytes(tensor)
    if expected is None:
        return  # strings have no fixed size
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        held = external.extent(tensor)[2]  # None: up to the end of the file, checked when read
    else:
        held = len(tensor.raw_data) if tensor.HasField("raw_data") else None
    if held is not None and held != expected:
        raise ModelError(f"{where}: tensor {name} holds {held} bytes of data, but its shape {list(tensor.dims)} "
                         f"needs {expected}; the model is corrupt")
    if held is not None or tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type in external.SUB_BYTE_BITS:
        return
    count = external.element_count(tensor)
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    values = len(getattr(tensor, field))
    per_element = 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
    if values and values != count * per_element:
        raise ModelError(f"{where}: tensor {name} holds {values} values, but its shape {list(tensor.dims)} "
                         f"needs {count * per_element}; the model is corrupt")


def external_data_files(model: onnx.ModelProto) -> dict[str, int]:
    """Map each external-data file a model references to the bytes it must hold at least
    (ModelError when an offset or length is not a whole number >= 0)."""
    needed: dict[str, int] = {}
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location, offset, length = external.extent(tensor)
        needed[location] = max(needed.get(location, 0), offset + (length or 0))
    return needed


def external_file(base_dir: Path, location: str) -> Path:
    """The file an external `location` names: relative, inside `base_dir` once links are resolved,
    else ModelError (a model never makes us read outside its own folder)."""
    if not location:
        raise ModelError("a tensor is stored in an external file but names none; the model is corrupt")
    shown = repr(location[:200])
    if "\0" in location or os.path.isabs(location):
        raise ModelError(f"external data location {shown} is not a path relative to the model's folder; "
                         "refusing to read it")
    folder = os.path.realpath(base_dir)
    named = os.path.normpath(os.path.join(folder, location))
    target = os.path.realpath(named)
    if os.path.commonpath([folder, target]) != folder or target == folder:
        raise ModelError(f"external data location {shown} points outside the model's folder '{base_dir}' "
                         "(through '..' or a link); refusing to read it")
    if target != named:  # onnx and onnxruntime refuse links too
        raise ModelError(f"external data location {shown} goes through a symbolic link; keep the data file itself "
                         "in the model's folder")
    return Path(target)


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Every referenced external-data file is inside the model's folder, exists, and is as long as its
    tensors declare."""
    for location, end in external_data_files(model).items():
        file = external_file(base_dir, location)
        shown = f"'{base_dir / location[:200]}'" + (f" ({len(location)} characters)" if len(location) > 200 else "")
        try:
            status = file.stat()
        except FileNotFoundError as e:
            raise ModelError(f"external data file {shown} is missing; keep it next to the model file") from e
        except OSError as e:  # a name too long, a folder in the path that is a file: no such file for us
            raise ModelError(f"external data file {shown} cannot be read: {e.strerror}") from e
        if not stat.S_ISREG(status.st_mode):
            raise ModelError(f"external data file {shown} is not a regular file")
        actual = status.st_size
        if actual < end:
            raise ModelError(
                f"external data file {shown} is truncated: {actual} bytes, tensors need {end}")


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and every external-data file it reads (each checked as load_model does)."""
    path = checked_model_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return [path]  # load_model says what is wrong with it
    return [path] + [external_file(path.parent, location) for location in external_data_files(proto)]


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in ((domain,) if domain else ("", "ai.onnx")):
            return entry.version
    return 0


#: Lowest ONNX opset onnxcompress reads: onnxruntime implements no op below it (opset 7 models compress,
#: opset 6 ones are refused by onnxruntime at load).
MIN_OPSET = 7


def check_opset(model: onnx.ModelProto, name: str = "model", limit: int | None = None) -> None:
    """ModelError unless the model's ONNX opset is between MIN_OPSET and `limit` (None: no upper bound)."""
    opset = opset_of(model)
    imports_onnx = any(entry.domain in ("", "ai.onnx") for entry in model.opset_import)
    if imports_onnx and opset < MIN_OPSET:
        raise ModelError(f"{name} uses ONNX opset {opset}; onnxcompress supports opsets {MIN_OPSET} to {limit or 'the latest'}: "
                         f"convert it first (onnx.version_converter.convert_version(model, {MIN_OPSET + 6}))")
    if limit is not None and opset > limit:
        raise ModelError(
            f"{name} uses ONNX opset {opset}, but the installed onnxruntime runs at most opset {limit}; "
            "upgrade onnxruntime or re-export the model at a lower opset")


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model holds (inline or external)."""
    total = 0
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += external.extent(tensor)[2] or 0
        else:
            total += tensor.ByteSize()
    return total


def file_bytes(path: str | os.PathLike) -> int:
    """Whole-file size on disk: the .onnx file plus every external-data file it references."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    for location in external_data_files(model):
        extra = external_file(path.parent, location)
        if extra.is_file():
            total += extra.stat().st_size
    return total


def output_roles(output: str | os.PathLike) -> list[Role]:
    """What writing a model to `output` may create: the file, and its external-data file beside it."""
    out = Path(output)
    return [Role("the output model", out), Role("the output's data file", out.parent / data_file_name(out))]


def data_file_name(output: Path) -> str:
    return output.name + ".data"


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               plan: OutputPlan | None = None) -> Path:
    """Write `model` to `path` atomically; with external data beside it when large or asked.

    The model and its data file are written under temporary names in the destination folder
    and renamed into place only when both are complete: here, or by `plan`'s commit when given
    (then `path` must be one of the plan's outputs, checked up front). Tensors of a streamed model
    that still live in the source's external file (or the spill file) are copied chunk by chunk,
    never loaded whole; `model` is left as it was. A failed write leaves nothing behind.
    """
    out = Path(path)
    if plan is None:
        with OutputPlan(output_roles(out)).check() as own:
            save_model(model, out, external_data=external_data, plan=own)
            own.commit()
        return out
    streamed = external.has_external(model)
    if external_data is None:
        external_data = streamed or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = data_file_name(out)
    data_path = out.parent / data_name
    if external_data and data_path.resolve() in external.source_files(model):
        raise OutputError(f"cannot write '{out}': its data file '{data_name}' would overwrite the data of the "
                          "model being saved; choose another output name")
    undo: list = []
    bookkeeping: list = []
    try:
        tmp_model = plan.temp(out)
        if external_data:
            undo = datafile.write_data_file(model, plan.temp(data_path), data_name)
            bookkeeping = external.strip_bookkeeping(model)
            tmp_model.write_bytes(model.SerializeToString())
            if not undo:
                plan.drop(data_path)
        else:
            plan.drop(data_path)
            to_write = external.inline_copy(model) if streamed else model
            bookkeeping = external.strip_bookkeeping(model)
            tmp_model.write_bytes(to_write.SerializeToString())
    except OSError as e:
        raise OutputError(f"cannot write '{out}': {e.strerror or e}") from e
    finally:
        datafile.undo_writes(undo)
        external.restore_bookkeeping(model, bookkeeping)
    log.debug("staged %s (%d bytes)", out, plan.staged_bytes(out, data_path))
    return out
