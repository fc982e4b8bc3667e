"""Model-local functions (the FunctionProtos in model.functions) inlined at load, as onnxruntime inlines them.

A weight inside a function body (a Constant node) is then a Constant of the graph, which weight discovery
finds and every pass compresses; left in the function it was copied to the output unchanged.

The expansion is bounded before anything is expanded: a call to a function costs the nodes of its body,
each call inside it the callee's, so a few bytes of nested calls (f calls g twice, g calls h twice, ... 30
deep) declare 2**30 nodes, which onnxruntime would build too (its load never ended). Such a model, a function
that calls itself (directly or through others), two functions with the same id and a call whose domain is
not imported are refused with one ModelError line, as onnxruntime refuses them.

Functions onnxruntime does not run as functions are left as they are: one whose name and domain are an op
onnxruntime implements at the model's opset (onnxruntime runs the op: a local 'Relu' in the default domain
is not called). A function importing another version of an ONNX domain than the model is inlined as it is when
its ops are defined the same at both versions, else converted to the model's versions by onnx's version converter
(validation then compares the result with the original in onnxruntime); when that fails, or such a function and
one of those ops are both in a model, all functions are left as they are: their weights stay float, with a
warning.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import onnx
import onnx.inliner

from onnxcompress.errors import ModelError
from onnxcompress.graph.edit import iter_graphs

log = logging.getLogger(__name__)

#: Most nodes a model's graph may hold once its model-local functions are inlined (subgraphs included).
#: The largest real graphs are ~10**5 nodes (a 32-layer transformer exported op by op: 30,000).
MAX_INLINED_NODES = 1_000_000

# domains whose ops onnxruntime implements itself: a local function of one of its op names is not called
_RUNTIME_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.microsoft.dml", "com.ms.internal.nhwc")

_ONNX_DOMAINS = ("", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training")

FunctionId = tuple[str, str, str]  # domain, name, overload


def _id(fn: onnx.FunctionProto) -> FunctionId:
    return fn.domain, fn.name, fn.overload


def _call(node: onnx.NodeProto) -> FunctionId:
    return node.domain, node.op_type, node.overload


def _shown(fid: FunctionId) -> str:
    domain, name, overload = fid
    return repr(f"{domain}:{name}" + (f":{overload}" if overload else ""))[:200]


def _walk(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node of `nodes` and of their subgraphs (If/Loop/Scan bodies), depth first."""
    stack = [iter(nodes)]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            continue
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.append(iter(attr.g.node))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                stack.extend(iter(g.node) for g in attr.graphs)


def _imports(entries) -> dict[str, int]:
    return {("" if e.domain == "ai.onnx" else e.domain): e.version for e in entries}


def _runs_as_op(fid: FunctionId, opsets: dict[str, int]) -> bool:
    """Whether onnxruntime runs a node of this id as its own op rather than calling the local function."""
    domain, name, _ = fid
    if domain.startswith(_RUNTIME_DOMAINS):
        return True
    if domain not in _ONNX_DOMAINS:
        return False
    return onnx.defs.has(name, opsets.get(domain, 1), domain)


def _same_ops(fn: onnx.FunctionProto, opsets: dict[str, int]) -> bool:
    """Whether the function's ops mean what they mean at the model's opsets; a function importing another version
    of an ONNX domain whose ops' definitions are the same at both versions is set to the model's versions."""
    own = _imports(fn.opset_import)
    differ = {d: v for d, v in own.items() if d in opsets and opsets[d] != v}
    if not differ:
        return True
    if any(d not in _ONNX_DOMAINS for d in differ):
        return False
    for node in _walk(fn.node):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain in differ:
            try:
                theirs = onnx.defs.get_schema(node.op_type, differ[domain], domain).since_version
                ours = onnx.defs.get_schema(node.op_type, opsets[domain], domain).since_version
            except onnx.defs.SchemaError:
                return False
            if theirs != ours:
                return False
    for entry in fn.opset_import:
        entry.version = opsets.get("" if entry.domain == "ai.onnx" else entry.domain, entry.version)
    return True


def expanded_nodes(model: onnx.ModelProto, where: str = "the model") -> int:
    """The nodes the model's graph holds once every call to a model-local function is inlined (each call
    replaced by the callee's body, recursively), counted without expanding; ModelError for duplicate function
    ids, a recursive function, a call to a domain its caller does not import, or a count above
    MAX_INLINED_NODES (the bodies of functions left as ops count too: calls inside them are inlined)."""
    model_opsets = _imports(model.opset_import)
    functions: dict[FunctionId, onnx.FunctionProto] = {}
    for fn in model.functions:
        if _id(fn) in functions:
            raise ModelError(f"{where} defines the model-local function {_shown(_id(fn))} twice")
        functions[_id(fn)] = fn
    local = {fid for fid in functions if not _runs_as_op(fid, model_opsets)}

    def calls(nodes, opsets: dict[str, int], caller: str) -> list[FunctionId]:
        found = []
        for node in _walk(nodes):
            fid = _call(node)
            if fid in local:
                if fid[0] not in opsets:
                    raise ModelError(f"{where}: {caller} calls the function {_shown(fid)}, but does not import "
                                     f"its domain {fid[0]!r} (onnxruntime refuses such a model)")
                found.append(fid)
        return found

    callees = {fid: calls(functions[fid].node, _imports(functions[fid].opset_import), f"function {_shown(fid)}")
               for fid in local}
    size = _sizes(functions, local, callees, where)
    calls(model.graph.node, model_opsets, "the graph")
    # the graph's calls are inlined, and so are those in the bodies of functions left as ops
    bodies = [model.graph.node] + [functions[fid].node for fid in functions if fid not in local]
    total = 0
    for node in (node for nodes in bodies for node in _walk(nodes)):
        total += size.get(_call(node), 1)
        if total > MAX_INLINED_NODES:
            raise _too_many(where)
    return total


def _too_many(where: str) -> ModelError:
    return ModelError(f"{where}: its model-local functions expand to more than {MAX_INLINED_NODES} nodes when "
                      "inlined (nested or repeated calls), more than onnxcompress builds; onnxruntime would inline "
                      "them too")


def _sizes(functions, local: set[FunctionId], callees: dict[FunctionId, list[FunctionId]],
           where: str) -> dict[FunctionId, int]:
    """Each local function's inlined node count, callees first (Kahn's order); ModelError on a cycle. A count
    above MAX_INLINED_NODES is capped there, so no count grows without bound."""
    waiting = {fid: len(set(callees[fid])) for fid in local}
    callers: dict[FunctionId, set[FunctionId]] = {fid: set() for fid in local}
    for fid in local:
        for callee in set(callees[fid]):
            callers[callee].add(fid)
    ready = [fid for fid, n in waiting.items() if n == 0]
    size: dict[FunctionId, int] = {}
    while ready:
        fid = ready.pop()
        called = sum(size[c] for c in callees[fid])
        size[fid] = min(sum(1 for _ in _walk(functions[fid].node)) - len(callees[fid]) + called,
                        MAX_INLINED_NODES + 1)
        for caller in callers[fid]:
            waiting[caller] -= 1
            if waiting[caller] == 0:
                ready.append(caller)
    cyclic = sorted(fid for fid in local if fid not in size)
    if cyclic:
        raise ModelError(f"{where}: the model-local function {_shown(cyclic[0])} calls itself (directly or through "
                         f"{len(cyclic) - 1} other functions); onnxruntime refuses recursive functions")
    return size


def inline_functions(model: onnx.ModelProto, where: str = "the model") -> None:
    """Inline, in place, every call to a model-local function that onnxruntime calls as one (see the module
    docstring); the functions inlined are removed. ModelError as expanded_nodes says, or when onnx's inliner
    refuses the model."""
    if not model.functions:
        return
    expanded_nodes(model, where)
    opsets = _imports(model.opset_import)
    kept = [_id(fn)[:2] for fn in model.functions if _runs_as_op(_id(fn), opsets)]
    shell = _shell(model)
    _fill_defaults(shell)
    other = [fn for fn in shell.functions if not _same_ops(fn, opsets)]
    try:
        if not other:
            inlined = onnx.inliner.inline_selected_functions(shell, kept, exclude=True)
        elif kept:  # onnx's inliner converts versions only when it inlines every function
            raise ValueError(f"{kept[0]} is an op onnxruntime runs itself")
        else:
            inlined = onnx.inliner.inline_local_functions(shell, convert_version=True)
    except (onnx.checker.ValidationError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if other:
            log.warning("%s: model-local functions left as they are (the weights inside them are not compressed): "
                        "the function %s imports other opset versions than the model (%s against %s), and they "
                        "cannot be converted: %s", where, _shown(_id(other[0])), _imports(other[0].opset_import),
                        opsets, first[:300])
            return
        raise ModelError(f"{where}: cannot inline its model-local functions: {first}") from e
    graph = model.graph
    before = {out for _, nodes in _all_nodes(graph) for node in nodes for out in node.output}
    for field in ("node", "value_info"):
        graph.ClearField(field)
        getattr(graph, field).extend(getattr(inlined.graph, field))
    model.ClearField("functions")
    model.functions.extend(inlined.functions)
    for domain, version in _body_imports(model, shell).items():
        if domain not in opsets:
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
            opsets[domain] = version
    _share_copies(model, before)
    log.info("%s: model-local functions inlined (%d nodes now, %d functions left as ops onnxruntime runs)",
             where, len(graph.node), len(model.functions))


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the inliner reads of the model, without its graph's initializer data (their names kept, so inlined
    names avoid them): the inliner copies the model through bytes twice, and a 2 GB one cannot be serialized."""
    shell = onnx.ModelProto(ir_version=model.ir_version)
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    graph = model.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(shell.graph, field).extend(getattr(graph, field))
    for tensor in graph.initializer:
        shell.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
    for sparse in graph.sparse_initializer:
        shell.graph.initializer.add(name=sparse.values.name, data_type=sparse.values.data_type)
    return shell


def _fill_defaults(model: onnx.ModelProto) -> None:
    """Each call to a function gets the function's attribute defaults (attribute_proto) it does not set itself:
    onnx's inliner drops them (a LeakyRelu whose alpha refers to a function attribute defaulting to 0.3 got the
    op's own 0.01), onnxruntime applies them."""
    defaults = {_id(fn): fn.attribute_proto for fn in model.functions if fn.attribute_proto}
    if not defaults:
        return
    for nodes in [model.graph.node] + [fn.node for fn in model.functions]:
        for node in _walk(nodes):
            given = {a.name for a in node.attribute}
            node.attribute.extend(a for a in defaults.get(_call(node), ()) if a.name not in given)


def _body_imports(model: onnx.ModelProto, shell: onnx.ModelProto) -> dict[str, int]:
    """The opset imports of the inlined functions (their domains are used by the graph now)."""
    found: dict[str, int] = {}
    left = {_id(fn) for fn in model.functions}
    for fn in shell.functions:
        if _id(fn) not in left:
            for domain, version in _imports(fn.opset_import).items():
                found.setdefault(domain, version)
    return found


def _all_nodes(graph: onnx.GraphProto):
    return [(g, g.node) for g, _ in iter_graphs(graph)]


#: Constants smaller than this many bytes are left copied (an Identity in their place would be no smaller).
SHARED_CONSTANT_BYTES = 128


def _share_copies(model: onnx.ModelProto, before: set[str]) -> None:
    """A Constant of a function called n times is n equal Constants once inlined: the first becomes an
    initializer of the main graph (visible in every subgraph), the others Identity nodes reading it, so the
    weight is stored, compressed and measured once, as the input stored it."""
    groups: dict[bytes, list[tuple[onnx.GraphProto, onnx.NodeProto]]] = defaultdict(list)
    for graph, nodes in _all_nodes(model.graph):
        for node in nodes:
            if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in before
                    and len(node.attribute) == 1 and node.attribute[0].name == "value"
                    and node.attribute[0].t.ByteSize() >= SHARED_CONSTANT_BYTES):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(node.attribute[0].t)
                tensor.ClearField("name")
                groups[hashlib.sha256(tensor.SerializeToString()).digest()].append((graph, node))
    shared = 0
    for copies in groups.values():
        if len(copies) < 2:
            continue
        (home, first), rest = copies[0], copies[1:]
        tensor = model.graph.initializer.add()
        tensor.CopyFrom(first.attribute[0].t)
        tensor.name = first.output[0]
        home.node.remove(first)
        for _, node in rest:
            node.op_type = "Identity"
            node.ClearField("attribute")
            node.input.append(tensor.name)
        shared += len(rest)
    if shared:
        log.info("%d inlined copies of function constants read one initializer each", shared)
