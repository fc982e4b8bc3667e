"""The options reference: `onnxcompress recipes --options` and docs/options.md, both from the configs."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from onnxcompress.cli import main
from onnxcompress.passes import PASSES
from onnxcompress.recipes.options import field_help

ROOT = Path(__file__).resolve().parent.parent


def test_text_lists_every_option_of_every_pass(capsys):
    assert main(["recipes", "--options"]) == 0
    out = capsys.readouterr().out
    blocks = {b.split(":", 1)[0]: b for b in out.split("\n\n") if b.strip()}
    assert set(blocks) == set(PASSES)
    for name, pass_type in PASSES.items():
        for f in dataclasses.fields(pass_type.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f"\n  {f.name}: {f.type} = {default!r}\n" in blocks[name] + "\n", (name, f.name)


def test_json_gives_every_option_a_type_default_and_help(capsys):
    assert main(["recipes", "--options", "--json"]) == 0
    doc = {p["pass"]: p for p in json.loads(capsys.readouterr().out)}
    assert set(doc) == set(PASSES)
    for name, pass_type in PASSES.items():
        fields = dataclasses.fields(pass_type.Config)
        options = doc[name]["options"]
        assert [o["name"] for o in options] == [f.name for f in fields]
        for f, o in zip(fields, options):
            assert o["type"] == f.type
            # every option a recipe may set says what it does (a config field without a comment fails here)
            assert o["help"].strip(), f"{name}.{f.name} has no comment in {pass_type.Config.__name__}"
    assert doc["share"]["options"][1] == {"name": "bits_fc", "type": "int", "required": False, "default": 5,
                                          "help": "Gemm and MatMul weights (the paper: 5 bits, down to 2)"}
    metric = next(o for o in doc["bitwidth"]["options"] if o["name"] == "metric")
    assert "not in a recipe file" in metric["help"]


def test_recipes_json_lists_the_builtins(capsys):
    assert main(["recipes", "--json"]) == 0
    doc = {r["recipe"]: r for r in json.loads(capsys.readouterr().out)}
    assert doc["deep-compression"]["form"] == "packed"
    assert [p["pass"] for p in doc["int8"]["passes"]] == ["calibrate", "qdq"]


@dataclass(kw_only=True)
class _Documented:
    plain: int = 1  # the trailing comment
    # a block above
    # on two lines
    above: str = "x"
    both: float = 0.5  # trailing wins
    bare: list = field(default_factory=list)

    def method(self):  # not a field
        pass


def test_help_comes_from_the_trailing_comment_else_the_lines_above():
    assert field_help(_Documented) == {"plain": "the trailing comment", "above": "a block above on two lines",
                                       "both": "trailing wins", "bare": ""}


def test_docs_page_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "options.md"
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "make_options.py"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, "docs/options.md is stale: run python docs/make_options.py"
    for name, pass_type in PASSES.items():
        assert f"\n## {name}\n" in committed
        for f in dataclasses.fields(pass_type.Config):
            assert f"| `{f.name}` |" in committed, (name, f.name)
