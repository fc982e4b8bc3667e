"""Packaging that leaves the user's onnxruntime alone: no hard dependency on the CPU wheel, and one
line naming what to install when no onnxruntime can be imported."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "lenet300.onnx"

# run the CLI as a user without any onnxruntime distribution would (the import is blocked before anything runs)
_BLOCKED = "import sys; sys.modules['onnxruntime'] = None; from onnxcompress.cli import main; sys.exit(main(sys.argv[1:]))"


def _run_blocked(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKED, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_compress_without_onnxruntime_names_what_to_install(tmp_path):
    out = tmp_path / "small.onnx"
    proc = _run_blocked("compress", str(SAMPLE), "-o", str(out), "--recipe", "share", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnxcompress: error: onnxruntime cannot be imported")
    for name in ("onnxcompress[cpu]", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        assert name in lines[0]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_inspect_without_onnxruntime_is_one_line_exit_2(tmp_path):
    proc = _run_blocked("inspect", str(SAMPLE), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "pip install 'onnxcompress[cpu]'" in proc.stderr


def test_recipes_listing_needs_no_runtime(tmp_path):
    proc = _run_blocked("recipes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("share ") and proc.stderr == ""


def test_library_import_raises_a_typed_import_error(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from onnxcompress.errors import RuntimeMissingError\n"
            "try:\n    import onnxcompress.api\n"
            "except RuntimeMissingError as e:\n    assert isinstance(e, ImportError); print('missing:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("missing: onnxruntime cannot be imported")


def test_onnxruntime_is_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements):
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for r in requirements}

    assert "onnxruntime" not in names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "onnxruntime" in names(extras["cpu"])
    assert "onnxruntime" in names(extras["dev"])  # the README's `pip install -e ".[dev]"` still runs everything


def test_onnxruntime_is_imported_in_one_place():
    importers = set()
    for path in [*(ROOT / "onnxcompress").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(m == "onnxruntime" or m.startswith("onnxruntime.") for m in modules):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"onnxcompress/runtime/sessions.py"}
