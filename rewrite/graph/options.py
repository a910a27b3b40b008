"""Declarative options: dataclass fields with help text, whose `Literal[...]` types are the choices.

Passes (and recipe configs) declare options as typed dataclass fields; `check_choices` checks every
`Literal` field once, when the object is created, and the CLI turns the same types into
`click.Choice` flags, so the accepted values are written down exactly once.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from rewrite.errors import RewriteError


def option(default: Any = None, help: str = "", *, label: str | None = None, **kwargs: Any) -> Any:
    """A pass option: a dataclass field whose help text the CLI shows. An option typed `Literal[...]`
    (or `list[Literal[...]]`) is checked against its choices when the pass is created; `label` names
    it in that error (default: the option's name)."""
    metadata = {"help": help, "label": label}
    if isinstance(default, (list, dict)):
        factory = type(default)
        return dataclasses.field(default_factory=lambda: factory(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _members(annotation) -> list:
    """The alternatives of a union annotation (`X | None` -> [X, None])."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def choices(annotation) -> tuple[tuple[Any, ...], bool] | None:
    """(allowed values, whether the option is a list of them) for a `Literal` option, else None."""
    for member in _members(annotation):
        if typing.get_origin(member) is Literal:
            return typing.get_args(member), False
        if typing.get_origin(member) is list:
            (item,) = typing.get_args(member) or (None,)
            if typing.get_origin(item) is Literal:
                return typing.get_args(item), True
    return None


def check_choices(obj: Any) -> None:
    """Every `Literal` field of the dataclass `obj` holds one of its choices; else one sentence naming it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = choices(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is None or value is None:
            continue
        values, many = allowed
        given = list(value) if many and isinstance(value, (list, tuple)) else [value]
        unknown = [v for v in given if v not in values]
        if unknown:
            label = f.metadata.get("label") or f.name
            shown = ", ".join(map(str, unknown)) if many else repr(unknown[0])
            raise RewriteError(f"{label} {shown} is not known; use one of {', '.join(map(str, values))}")
