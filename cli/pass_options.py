"""Command-line flags generated from the registered passes' option fields.

Every pass option `some_name` becomes `--some-name`; a flag goes to each selected pass that has the
option. Lists are comma-separated, dicts are JSON, and `--targets re:PATTERN` passes a regex; an
option typed `Literal[...]` becomes a `click.Choice` of those values.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing

import click

from rewrite.errors import RewriteError
from rewrite.graph.options import choices
from rewrite.graph.pipeline import available, pass_class


def _kinds(annotation) -> set:
    """The plain types an annotation admits: `str | list[str] | None` -> {str, list[str]}; a `Literal`
    of strings is `str` (its choices are checked by `click.Choice` and by the pass)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return {k for arg in typing.get_args(annotation) if arg is not type(None) for k in _kinds(arg)}
    if typing.get_origin(annotation) is typing.Literal:
        return {str}
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return {list[next(iter(_kinds(item)))]}
    return {annotation}


def _convert(name: str, annotation, raw: str):
    kinds = _kinds(annotation)
    try:
        if dict in kinds or any(typing.get_origin(k) is dict for k in kinds):
            return json.loads(raw)
        if str in kinds and raw.startswith("re:"):
            return raw[3:]
        for kind in kinds:
            if typing.get_origin(kind) is list:
                (item,) = typing.get_args(kind)
                return [item(part.strip()) for part in raw.split(",") if part.strip()]
        for kind in (int, float, str):
            if kind in kinds:
                return kind(raw)
    except (ValueError, json.JSONDecodeError) as error:
        raise RewriteError(f"--{name.replace('_', '-')} {raw!r} could not be read: {error}") from error
    raise RewriteError(f"--{name.replace('_', '-')} has a type the command line cannot express; use --pipeline")


def _widened(first, second):
    """The flag's type when two passes type one option differently: their choices together, if both are
    `Literal`s (each pass checks its own), else the first's."""
    a, b = choices(first), choices(second)
    if a and b and not a[1] and not b[1]:
        return typing.Literal[tuple(dict.fromkeys(a[0] + b[0]))]
    return first


def _option_specs() -> dict[str, tuple[object, str]]:
    """Option name -> (annotation, help naming the passes that take it), over every registered pass."""
    found: dict[str, tuple[object, str]] = {}
    for name in available():
        hints = typing.get_type_hints(pass_class(name))
        for field in dataclasses.fields(pass_class(name)):
            if field.name in found:
                annotation, help_text = found[field.name]
                found[field.name] = (_widened(annotation, hints[field.name]), help_text.replace("]", f", {name}]", 1))
            else:
                found[field.name] = (hints[field.name], f"[{name}] {field.metadata.get('help', '')}")
    return found


def add_pass_options(command):
    """Decorates a click command with one flag per pass option (all default to "not given")."""
    for name, (annotation, help_text) in sorted(_option_specs().items(), reverse=True):
        flag = "--" + name.replace("_", "-")
        allowed = choices(annotation)
        if _kinds(annotation) == {bool}:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif allowed is not None and not allowed[1]:
            option = click.option(flag, name, default=None, type=click.Choice(allowed[0]), help=help_text)
        else:
            option = click.option(flag, name, default=None, metavar="VALUE", help=help_text)
        command = option(command)
    return command


def options_for(pass_name: str, given: dict[str, object]) -> dict[str, object]:
    """The given flags that `pass_name` accepts, converted to its option types."""
    hints = typing.get_type_hints(pass_class(pass_name))
    chosen = {}
    for field in dataclasses.fields(pass_class(pass_name)):
        value = given.get(field.name)
        if value is None:
            continue
        chosen[field.name] = value if isinstance(value, bool) else _convert(field.name, hints[field.name], value)
    return chosen


def unused_options(pass_names: list[str], given: dict[str, object]) -> list[str]:
    accepted = {f.name for n in pass_names for f in dataclasses.fields(pass_class(n))}
    return sorted(k for k, v in given.items() if v is not None and k not in accepted)
