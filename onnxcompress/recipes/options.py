"""The reference of every pass option, read from the passes' typed config dataclasses.

Each option's help is the comment its config gives it in the source: the comment at the end of the
field's line, else the comment lines directly above the field. `onnxcompress recipes --options` prints
it and `docs/make_options.py` writes docs/options.md from it, so neither can drift from the code.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any

from . import BUILTIN, CODE_OPTIONS

REQUIRED = object()  # a field without a default (none today: every option has one)


@dataclass(frozen=True)
class Option:
    name: str
    type: str  # the annotation as written in the config
    default: Any  # the value, or REQUIRED
    help: str  # one line


@dataclass(frozen=True)
class PassOptions:
    name: str
    summary: str  # the first line of the pass module's docstring
    config: str  # the config class's name
    recipes: list[str]  # built-in recipes that run the pass
    options: list[Option]


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            out[tok.start[0]] = (text, not tok.line[:tok.start[1]].strip())
    return out


def field_help(config_type: type) -> dict[str, str]:
    """Each field's one-line help from the comments of the config's source (empty when it has none)."""
    source = textwrap.dedent(inspect.getsource(config_type))
    comments = _comments(source)
    body = ast.parse(source).body[0].body
    helps = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not comments[n][1]]
        above = []
        line = node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        helps[node.target.id] = " ".join(trailing or above)
    return helps


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def pass_options() -> list[PassOptions]:
    """Every pass recipes can name, in the registry's order, with each of its config's options."""
    from onnxcompress.passes import PASSES

    result = []
    for name, pass_type in PASSES.items():
        config = pass_type.Config
        helps = field_help(config)
        options = []
        for f in dataclasses.fields(config):
            text = helps.get(f.name, "")
            if f.name in CODE_OPTIONS:
                text = (text + "; " if text else "") + "command line or Python API only, not in a recipe file"
            options.append(Option(f.name, f.type if isinstance(f.type, str) else inspect.formatannotation(f.type),
                                  _default(f), text))
        module = sys.modules[pass_type.__module__]
        summary = (inspect.getdoc(module) or "").splitlines()[0] if inspect.getdoc(module) else ""
        recipes = [r for r, steps in BUILTIN.items() if any(p == name for p, _ in steps)]
        result.append(PassOptions(name, summary, config.__name__, recipes, options))
    return result


def _value(default: Any) -> str:
    return "(required)" if default is REQUIRED else repr(default)


def options_text(width: int = 100) -> str:
    """The plain-text listing `onnxcompress recipes --options` prints."""
    lines = []
    for p in pass_options():
        lines.append(f"{p.name}: {p.summary}")
        lines.append(f"  in recipes: {', '.join(p.recipes) or '(none built in)'}")
        for o in p.options:
            lines.append(f"  {o.name}: {o.type} = {_value(o.default)}")
            if o.help:
                lines.extend(textwrap.wrap(o.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
        lines.append("")
    return "\n".join(lines)


def options_json() -> str:
    """The same reference as JSON: a list of passes, each with its options."""
    doc = [{"pass": p.name, "summary": p.summary, "config": p.config, "recipes": p.recipes,
            "options": [{"name": o.name, "type": o.type, "required": o.default is REQUIRED,
                         "default": None if o.default is REQUIRED else o.default, "help": o.help}
                        for o in p.options]}
           for p in pass_options()]
    return json.dumps(doc, indent=2, default=repr)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_markdown() -> str:
    """docs/options.md: a table of options per pass."""
    out = ["# Pass options", "",
           "Generated by `python docs/make_options.py` from the passes' config dataclasses (the same code as",
           "`onnxcompress recipes --options`); do not edit by hand. A recipe file gives a pass its options as",
           "a mapping, for example:", "",
           "```yaml", "name: my-recipe", "passes:", "  - prune: {sparsity_fc: 0.9}",
           "  - share: {bits_fc: 4, granularity: tensor}", "```", ""]
    for p in pass_options():
        out += [f"## {p.name}", "", f"{p.summary} Config: `{p.config}`; in the built-in recipes "
                f"{', '.join(f'`{r}`' for r in p.recipes) or '(none)'}.", "",
                "| option | type | default | help |", "| --- | --- | --- | --- |"]
        out += [f"| `{o.name}` | `{_cell(o.type)}` | `{_cell(_value(o.default))}` | {_cell(o.help)} |"
                for o in p.options]
        out.append("")
    return "\n".join(out)
