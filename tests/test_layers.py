"""The layers import downward only, and no modules import each other in a loop.

Read from the source (every import statement, also those inside functions or under TYPE_CHECKING:
an import hidden in a function is still an arrow), so the test needs nothing installed beyond the tree.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: rank of each layer, bottom first; a module may import its own package and any lower rank
RANKS = {
    "errors": 0,
    "numerics": 1,  # pure numpy kernels
    "execution": 2,  # executors: serial, processes, Ray
    "graph": 3,  # model and data I/O, external data, weight discovery, graph rewrites
    "formats": 4,  # how a compressed weight is written: codebook chains, QDQ, packed blobs, our op
    "runtime": 5,  # onnxruntime sessions, statistics, evaluation and task metrics
    "fitting": 6,  # data-driven weight fits built on the runtime's statistics
    "pipeline": 7,  # pass base, context, manager, search-then-verify
    "passes": 8,
    "recipes": 9,
    "api": 10, "report": 10, "plots": 10,
    "arguments": 11,  # the command line's parser
    "cli": 12,
}
#: what each layer may not import at all
FORBIDDEN = {
    "numerics": ("onnx", "onnxruntime"),
    "execution": ("onnx", "onnxruntime"),
    "graph": ("onnxruntime",),
    "formats": ("onnxruntime",),
}
#: the passes (one file a pass); other files in passes/ are parts of one pass
PASSES = {"calibrate", "qdq", "prune", "share", "sparse", "entropy", "bitwidth"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "onnxcompress").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(p for p in parts if p != "__init__") or "onnxcompress"] = path
    for path in (ROOT / "passes").glob("*.py"):
        name = "onnxcompress.passes" + ("" if path.stem == "__init__" else "." + path.stem)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ours (and top-level third-party names) that `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:  # `from pkg import module` imports the module
                out.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return out


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "onnxcompress" else None


def test_every_module_is_in_a_layer():
    assert {_layer(m) for m in MODULES if m != "onnxcompress"} <= set(RANKS)


def test_imports_go_downward_only():
    upward = []
    for name, imported in IMPORTS.items():
        layer = _layer(name)
        if layer is None:
            continue
        for target in imported:
            other = _layer(target)
            if other is None or other == layer:
                continue
            if RANKS[other] >= RANKS[layer]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def test_lower_layers_do_not_import_onnx_or_the_runtime():
    found = [f"{name} imports {target}" for name, imported in IMPORTS.items()
             for target in imported if _layer(name) in FORBIDDEN
             and target.split(".")[0] in FORBIDDEN[_layer(name)]]
    assert not found, "\n".join(sorted(found))


def test_a_pass_never_imports_another_pass():
    found = []
    for name, imported in IMPORTS.items():
        if _layer(name) != "passes" or name == "onnxcompress.passes":
            continue
        own = name.rsplit(".", 1)[1]
        for target in imported:
            other = target.rsplit(".", 1)[1] if _layer(target) == "passes" else None
            if other in PASSES and other != own:
                found.append(f"{name} -> {target}")
    assert not found, "\n".join(found)


def test_no_import_cycle():
    graph = {name: {t for t in imported if t in MODULES and t != name} for name, imported in IMPORTS.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (loop := visit(nxt)):
                return loop
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (loop := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(loop))


def test_the_checker_sees_an_upward_import():
    """The rule itself can fail: a graph-layer module importing the runtime is reported."""
    name = "onnxcompress.graph.model"
    imported = IMPORTS[name] | {"onnxcompress.runtime.sessions"}
    upward = [t for t in imported if _layer(t) and _layer(t) != "graph" and RANKS[_layer(t)] >= RANKS["graph"]]
    assert upward == ["onnxcompress.runtime.sessions"]
