"""Config sections as strict pydantic dataclasses: each key's type, bounds, default and
meaning in one place (`section_config`, `Field(description=...)`), checked on construction
and when read from a file (`validate`), with one error line that names where, the key, the
expected type and the value given; and the reference rows and example TOML generated from
them (`describe`, `example_toml`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import textwrap
import typing
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from .errors import RaysoupError

# Strict as JSON is: an integer is a valid float; nothing converts to a bool or a string.
SECTION_CONFIG = ConfigDict(strict=True, extra="forbid")
UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


@dataclasses.dataclass(frozen=True)
class Rule(AfterValidator):
    """A check of a value beyond its type and bounds (an AfterValidator: it raises
    ValueError with what the value must be), with the words the reference's type column
    shows for it ("" for none)."""

    words: str = ""


def Interval(low: float = -math.inf, high: float = math.inf):
    """[lower, upper] with low <= lower < upper <= high."""
    words = (
        "lower < upper"
        if (low, high) == (-math.inf, math.inf)
        else f"{low:g} <= lower < upper <= {high:g}"
    )

    def check(pair: tuple[float, float]) -> tuple[float, float]:
        if not low <= pair[0] < pair[1] <= high:
            raise ValueError(f"must be [lower, upper] with {words}")
        return pair

    return Annotated[tuple[float, float], Rule(check, words)]


def known_optimizer(name: str) -> str:
    """`name` if nevergrad's registry has it, else ValueError with the closest name."""
    import nevergrad as ng  # on first use: typed is imported by every config reader

    if name not in ng.optimizers.registry:
        import difflib

        close = [
            n for n in ng.optimizers.registry if n.lower() == name.lower()
        ] or difflib.get_close_matches(name, list(ng.optimizers.registry), n=1, cutoff=0.8)
        hint = (
            f"; did you mean {close[0]!r}?"
            if close
            else " (see nevergrad.optimizers.registry for the names)"
        )
        raise ValueError(f"unknown nevergrad optimizer {name!r}{hint}")
    return name


Optimizer = Annotated[str, Rule(known_optimizer, "a nevergrad optimizer name")]


def section_config(cls):
    """A frozen pydantic dataclass that validates strictly and refuses unknown keys, on
    construction in Python as from a file; its errors are one RaysoupError line that names
    the key as `SECTION.key` (the class's `SECTION`, where it has one). It stays a
    dataclass: dataclasses.fields, asdict and replace work as on any."""
    cls = pydantic_dataclass(frozen=True, config=SECTION_CONFIG)(cls)
    validating_init = cls.__init__

    @functools.wraps(validating_init)
    def __init__(self, *args, **kwargs):
        try:
            validating_init(self, *args, **kwargs)
        except ValidationError as e:
            section = getattr(type(self), "SECTION", "")
            names = [f.name for f in dataclasses.fields(type(self))]
            raise RaysoupError(
                error_line(
                    type(self),
                    e,
                    {**dict(zip(names, args)), **kwargs},
                    "",
                    f"{section}." if section else "",
                    f"[{section}]" if section else type(self).__name__,
                )
            ) from None

    cls.__init__ = __init__
    return cls


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


def constraint_words(metadata: Iterable) -> list[str]:
    """pydantic metadata in words: ['>= 1'] for Ge(1) or Field(ge=1), and each Rule's
    words."""
    out = []
    for info in metadata:
        for constraint in getattr(info, "metadata", [info]):
            for attr, symbol in BOUNDS.items():
                if getattr(constraint, attr, None) is not None:
                    out.append(f"{symbol} {getattr(constraint, attr)}")
            if isinstance(constraint, Rule) and constraint.words:
                out.append(constraint.words)
    return out


def shown(value) -> str:
    return json.dumps(value, default=str)


def error_line(cls, error: ValidationError, given: dict, where: str, prefix: str, what: str) -> str:
    """pydantic's first error about `given` (the keys given for `cls`) as one line."""
    head = f"{where}: " if where else ""
    errors = error.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] in UNKNOWN_KEY)
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(cls))
        return (
            f"{head}unknown key(s) {', '.join(prefix + k for k in unknown)}; known keys "
            f"of {what}: {', '.join(known)}"
        )
    first = errors[0]
    if first["type"] == "value_error" and not first["loc"]:  # a __post_init__'s own line
        return f"{head}{first['ctx']['error']}"
    key = first["loc"][0] if first["loc"] else "?"
    if isinstance(key, int):  # a positional argument in Python
        names = [f.name for f in dataclasses.fields(cls)]
        key = names[key] if key < len(names) else f"argument {key + 1}"
    types = {row[0]: row[1] for row in describe(cls)}
    if key not in given:  # a required key left out (not a value too short)
        return f"{head}{prefix}{key} is required: expected {types.get(key, '?')}"
    value = f"{head}{prefix}{key} = {shown(given[key])}"
    if first["type"] == "value_error":  # a Rule's: what the value must be
        return f"{value}: {first['ctx']['error']}"
    message = (
        "too few values"
        if first["type"] == "missing"
        else first["msg"][0].lower() + first["msg"][1:]
    )
    return f"{value}: expected {types.get(key, '?')} ({message})"


def validate(cls, table, where: str, prefix: str = "", what: str = ""):
    """`table` into the section_config class `cls`, strictly, as JSON types (an integer is a
    valid float; nothing converts to a bool or a string); the class's own checks run too.
    `where` names the file, `prefix` the section ("method."), `what` the table."""
    what = what or f"[{prefix.rstrip('.')}]"
    if not isinstance(table, dict):
        raise RaysoupError(f"{where}: {what} must be a table of keys, got {table!r}")
    try:
        return _adapter(cls).validate_json(shown(table), strict=True)
    except ValidationError as e:
        raise RaysoupError(error_line(cls, e, table, where, prefix, what)) from None


def default_of(info) -> object:
    """A pydantic field's default (its factory's value), or MISSING where it is required."""
    if info.is_required():
        return dataclasses.MISSING
    return info.get_default(call_default_factory=True)


def describe(cls) -> list[tuple[str, str, str, str]]:
    """(key, type with its bounds, default as JSON or "required", description) for every
    key of a section_config class, in field order."""
    rows = []
    for key, info in cls.__pydantic_fields__.items():
        default = default_of(info)
        rows.append(
            (
                key,
                ", ".join([type_name(info.annotation), *constraint_words(info.metadata)]),
                "required" if default is dataclasses.MISSING else shown(default),
                info.description or "",
            )
        )
    return rows


def toml_value(value) -> str:
    """A default as TOML writes it (a tuple as an array)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float | str):
        return json.dumps(value)  # a JSON string's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{value!r} has no TOML form")


COMMENT_COLUMN = 35
WIDTH = 100


def commented(code: str, comment: str) -> list[str]:
    """`code` with `comment` beside it at COMMENT_COLUMN, wrapped within WIDTH columns,
    continuation lines aligned under the first; without code, a block of comment lines."""
    if not code:
        return [f"# {line}" for line in textwrap.wrap(comment, WIDTH - 2)]
    if not comment:
        return [code]
    column = max(COMMENT_COLUMN, len(code) + 1)
    first, *rest = textwrap.wrap(comment, max(30, WIDTH - column - 2))
    return [f"{code:<{column}}# {first}", *(f"{'':<{column}}# {line}" for line in rest)]


def example_toml(sections: Iterable[tuple[str, type, str]]) -> str:
    """TOML with every key of each (section name, section_config class, section comment)
    at its default, its description beside it; name "" is the top level (its comment a
    block above the keys). A key without a default is written with its field's first
    `examples` value."""
    out = []
    for name, cls, comment in sections:
        if out:
            out.append("")
        out.extend(commented(f"[{name}]" if name else "", comment))
        for key, info in cls.__pydantic_fields__.items():
            value = default_of(info)
            if value is dataclasses.MISSING:
                if not info.examples:
                    raise TypeError(f"{cls.__name__}.{key} has no default and no examples")
                value = info.examples[0]
            out.extend(commented(f"{key} = {toml_value(value)}", info.description or ""))
    return "\n".join(out) + "\n"
