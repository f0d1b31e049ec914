"""One-line messages for recipe problems: which key, what was given, and the key that was probably meant."""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import BaseModel

from neftune_cli.recipe.schema import Recipe, section_model

MAX_SHOWN_CHARS = 200  # longest value echoed in a message


def shown(value: Any) -> str:
    """A value as messages echo it: JSON, cut to MAX_SHOWN_CHARS."""
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + f"... ({len(text):,} chars)"




def describe(err: dict) -> str:
    loc = err.get("loc", ())
    key = dotted_key(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        parent = model_at(loc[:-1])
        options = list(parent.model_fields) if parent else []
        return f"unknown key {key}{suggest(str(loc[-1]), options, loc[:-1])}"
    if kind == "missing":
        return f"{key}: required key is missing"
    value = err.get("input")
    given = shown(value) if not isinstance(value, dict) else "a mapping"
    message = err.get("msg", "invalid")
    message = message.removeprefix("Value error, ")
    if not key:
        return message
    return f"{key}: {message} (got {given})"


def dotted_key(loc: tuple) -> str:
    out = ""
    for part in loc:
        # pydantic adds the union member name to loc (e.g. 'list[str]', 'literal[...]'); skip those
        if isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"}):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part not in model.model_fields:
            return None
        model = section_model(model, part)
    return model


def suggest(name: str, options: list[str], parent: tuple | list) -> str:
    if not parent:
        # a section key written at the top level, e.g. `lr: 1e-4` instead of `train.lr`
        for section in options:
            sub = section_model(Recipe, section)
            if sub and name in sub.model_fields:
                return f" (did you mean `{section}.{name}`?)"
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if not close:
        return f"; valid keys: {', '.join(options)}" if options else ""
    prefix = ".".join(str(p) for p in parent if not isinstance(p, int))
    return f" (did you mean `{prefix + '.' if prefix else ''}{close[0]}`?)"
