"""Strict validation of a mapping (a TOML section, a manifest entry) into a dataclass, with
one error line that names where, the key, the expected type and the value given."""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import fields
from typing import Literal

from pydantic import TypeAdapter, ValidationError

from .errors import RaysoupError


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def type_name(annotation) -> str:
    """int, tuple[float, float], 'auto' | 'sharded' | 'whole': as a person writes them."""
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}


def bounds(annotation) -> list[str]:
    """An Annotated type's pydantic bounds, e.g. ['>= 1'] for Annotated[int, Field(ge=1)]."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return []
    out = []
    for info in annotation.__metadata__:
        for constraint in getattr(info, "metadata", [info]):
            for attr, symbol in BOUNDS.items():
                if getattr(constraint, attr, None) is not None:
                    out.append(f"{symbol} {getattr(constraint, attr)}")
    return out


def field_types(cls) -> dict[str, str]:
    """Each field's type as a person writes it, with its bounds: int, >= 1."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {k: ", ".join([type_name(typing.get_type_hints(cls)[k]), *bounds(t)])
            for k, t in hints.items()}


def validate(cls, table, where: str, prefix: str = "", what: str = ""):
    """`table` into the dataclass `cls`, strictly, as JSON types (an integer is a valid
    float; nothing converts to a bool or a string); the dataclass's own checks run too.
    `where` names the file, `prefix` the section ("method."), `what` the table."""
    what = what or f"[{prefix.rstrip('.')}]"
    if not isinstance(table, dict):
        raise RaysoupError(f"{where}: {what} must be a table of keys, got {table!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise RaysoupError(f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)}"
                           f"; known keys of {what}: {', '.join(sorted(known))}")
    try:
        return _adapter(cls).validate_json(json.dumps(table, default=str), strict=True)
    except ValidationError as e:
        error = e.errors()[0]
        if error["type"] == "value_error":  # the dataclass's own check (__post_init__)
            raise RaysoupError(f"{where}: {error['ctx']['error']}") from None
        key = str(error["loc"][0]) if error["loc"] else "?"
        message = "too few values" if error["type"] == "missing" else \
            error["msg"][0].lower() + error["msg"][1:]
        raise RaysoupError(f"{where}: {prefix}{key} = {json.dumps(table.get(key), default=str)}"
                           f": expected {field_types(cls).get(key, '?')} ({message})") from None


def check_choices(obj, section: str) -> None:
    """A dataclass's Literal fields hold one of their choices (for configs built in Python;
    a TOML file is checked by `validate` first)."""
    for name, annotation in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name, None)
        if typing.get_origin(annotation) is Literal and value not in typing.get_args(annotation):
            raise RaysoupError(f"{section}.{name} must be {type_name(annotation)}, got {value!r}")
