"""A pass's config dataclass built from a recipe's options, each checked against its type (pipeline layer)."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from onnxcompress.errors import RecipeError


def make_config(config_type: type, options: dict[str, Any], pass_name: str):
    """Build a config dataclass from a recipe's options, naming a misspelled option's closest match."""
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    hints = typing.get_type_hints(config_type)
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            suggestion = f"; did you mean '{close[0]}'?" if close else f"; options are {sorted(fields)}"
            raise RecipeError(f"pass '{pass_name}' has no option '{key}'{suggestion}")
        _check_type(pass_name, key, value, hints.get(key))
    try:
        return config_type(**options)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"pass '{pass_name}': {e}") from e


def _check_type(pass_name: str, key: str, value: Any, hint: Any) -> None:
    if hint is None:
        return
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", ())) else (hint,)
    for kind in allowed:
        kind = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is typing.Literal:
            continue
        if isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return
    literal = [a for k in allowed if typing.get_origin(k) is typing.Literal for a in typing.get_args(k)]
    if value in literal:
        return
    expected = " or ".join(repr(a) for a in literal) if literal else getattr(hint, "__name__", str(hint))
    raise RecipeError(f"pass '{pass_name}': option '{key}' must be {expected}, got {value!r}")
