"""Small helpers over ONNX graphs: walking subgraphs, naming, consumer maps, node provenance."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

import onnx

DOMAIN = "ai.onnxcompress"
PROVENANCE_KEY = "onnxcompress.pass"


def iter_graphs(graph: onnx.GraphProto, path: str = "main") -> Iterator[tuple[onnx.GraphProto, str]]:
    """Yield (graph, path) for `graph` and every subgraph below it (If/Loop/Scan bodies).

    A path reads like ``main/cond.then_branch``: the node that owns the subgraph (its name, else its op and
    first output: ``main/If(y).then_branch``) and the attribute holding it, so a user can find the place in
    Netron. Not the node's position: a pass inserting nodes before it would change its subgraphs' paths.
    """
    yield graph, path
    names: set[str] | None = None
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            if attr.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                continue
            if names is None:
                names = {n.name for n in graph.node if n.name}
            label = f"{path}/{_owner_label(node, index, names)}.{attr.name}"
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, label)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for k, sub in enumerate(attr.graphs):
                    yield from iter_graphs(sub, f"{label}[{k}]")


def _owner_label(node: onnx.NodeProto, index: int, names: set[str]) -> str:
    if node.name:
        return node.name  # unique in its graph (model._check_structure, as onnxruntime requires)
    made = f"{node.op_type}({node.output[0]})" if node.output and node.output[0] else f"{node.op_type}_{index}"
    return made if made not in names else f"{made}#{index}"


def all_tensors(model: onnx.ModelProto, *, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model, subgraphs included: initializers (unless asked not to),
    the values and indices of sparse initializers, and tensor attributes (Constant nodes)."""
    for graph, _ in iter_graphs(model.graph):
        if initializers:
            yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def find_graph(model: onnx.ModelProto, path: str) -> onnx.GraphProto:
    for graph, where in iter_graphs(model.graph):
        if where == path:
            return graph
    raise KeyError(path)


def consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Map tensor name -> [(node, input index)] for the nodes of `graph`.

    Nodes whose subgraphs read the name from the outer scope count as consumers too (input
    index -1), so a tensor used only inside an If branch is not mistaken for unused.
    """
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                found[name].append((node, i))
        for name in sorted(outer_names(node)):
            found[name].append((node, -1))
    return found


def outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read without defining them."""
    names: set[str] = set()
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            defined |= {o for n in sub.node for o in n.output}
            used = {i for n in sub.node for i in n.input if i}
            used |= {o.name for o in sub.output}
            for n in sub.node:
                used |= outer_names(n)
            names |= used - defined
    return names


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs (empty optional ones left out), then what its subgraphs read from the
    outer scope."""
    return [x for x in node.input if x] + sorted(outer_names(node))


def upstream_nodes(graph: onnx.GraphProto, names: Sequence[str], stop: set[str] = frozenset()
                   ) -> list[onnx.NodeProto]:
    """The nodes the tensors `names` depend on (through subgraphs' outer-scope reads too), in graph order,
    not walking past the names in `stop` (values already at hand)."""
    wanted, kept = set(names), []
    for node in reversed(graph.node):
        if wanted.intersection(o for o in node.output if o):
            kept.append(node)
            wanted.update(x for x in node_reads(node) if x not in stop)
    return kept[::-1]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for graph, _ in iter_graphs(model.graph):
        names |= {t.name for t in graph.initializer}
        names |= {i.name for i in graph.input} | {o.name for o in graph.output}
        for node in graph.node:
            names |= set(node.output) | set(node.input)
            names.add(node.name)
    return names


class NameScope:
    """Hands out names not yet used anywhere in a model."""

    def __init__(self, model: onnx.ModelProto):
        self._used = all_names(model)
        self._next: dict[str, int] = {}  # the suffix to try first for a base asked for before

    def fresh(self, base: str) -> str:
        name, k = base, self._next.get(base, 1)
        if k > 1:
            name = f"{base}_{k - 1}"
        while name in self._used:
            name, k = f"{base}_{k}", k + 1
        self._used.add(name)
        self._next[base] = k
        return name


def mark(node: onnx.NodeProto, pass_name: str) -> onnx.NodeProto:
    """Record on a new node which pass made it (metadata_props)."""
    entry = node.metadata_props.add()
    entry.key, entry.value = PROVENANCE_KEY, pass_name
    return node


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Declare a custom domain's opset; never changes the default domain's version."""
    for entry in model.opset_import:
        if entry.domain == domain:
            entry.version = max(entry.version, version)
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Remove from the main graph's inputs every name an initializer also defines, and return them.

    Such an input (IR < 4 required it; some exporters still write it) is a default a caller could
    override, so onnxruntime neither folds nor optimizes through it, and a compressed weight could
    not be one. Treated as the constant it is in practice, as onnxruntime advises; IR 4 is the first
    that allows initializers outside the inputs, so an older model is declared IR 4."""
    names = {t.name for t in model.graph.initializer}
    dropped = [value.name for value in model.graph.input if value.name in names]
    if dropped:
        keep = [value for value in model.graph.input if value.name not in names]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)
    return dropped


def upstream_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that computes only the main-graph tensors `names`, its outputs: the nodes they
    depend on (through subgraphs' outer-scope reads too), in graph order, and the initializers those
    read. Every graph input stays, so the same feeds serve. onnxruntime runs every node of a session
    whatever is fetched, so a run for a layer's input costs what the layers before it cost."""
    graph = model.graph
    kept = upstream_nodes(graph, names)
    wanted = set(names).union(*(node_reads(node) for node in kept))
    out = onnx.ModelProto()
    out.ir_version, out.producer_name, out.producer_version = model.ir_version, model.producer_name, model.producer_version
    out.domain, out.model_version = model.domain, model.model_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    made = {o for node in kept for o in node.output} | {i.name for i in graph.input}
    out.graph.name = graph.name
    out.graph.node.extend(kept)
    out.graph.input.extend(graph.input)
    out.graph.initializer.extend(t for t in graph.initializer if t.name in wanted)
    out.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in wanted)
    out.graph.value_info.extend(v for v in graph.value_info if v.name in made)
    declared = {o.name: o for o in graph.output} | {v.name: v for v in graph.value_info}
    out.graph.output.extend(declared.get(n, onnx.ValueInfoProto(name=n)) for n in dict.fromkeys(names))
    return out


def value_digests(model: onnx.ModelProto) -> dict[str, str] | None:
    """A digest per main-graph tensor (inputs, initializers, node outputs) that changes exactly when what
    computes its value does: a graph input's name; an initializer (name, type, shape, bytes); a node
    output's op, attributes (subgraphs included), the digests of what the node reads (through subgraphs
    too) and its position among the node's outputs. Two models (or two states of one) give a tensor the
    same digest when its value is the same function of the graph inputs. None when a weight's bytes live
    in an external file (their digest would name the place, not the bytes)."""
    graph = model.graph
    digests = {i.name: hashlib.sha256(b"input\0" + i.name.encode()).hexdigest() for i in graph.input}
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        digests[tensor.name] = hashlib.sha256(b"tensor\0" + tensor.SerializeToString()).hexdigest()
    for node in graph.node:
        h = hashlib.sha256(f"{node.domain}\0{node.op_type}\0".encode())
        for attr in node.attribute:
            h.update(attr.SerializeToString())
        for name in list(node.input) + sorted(outer_names(node)):  # not node_reads: an empty input's place counts
            h.update(b"\0" + digests.get(name, "?" + name).encode())
        for index, out in enumerate(node.output):
            if out:
                digests[out] = hashlib.sha256(h.digest() + index.to_bytes(4, "little")).hexdigest()
    return digests
