"""Pass protocol, registry and pipeline.

A pass is a dataclass of options that follows `torch.fx.passes.infra`'s `PassBase` protocol
(`call(gm) -> PassResult`), so it also runs under PyTorch's own `PassManager`. The pipeline lints
and recompiles after each pass and records the pass, its options and its report in
`gm.meta["rewrite"]["history"]`, so a saved graph says how it was made.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable

import yaml
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from rewrite.errors import RewriteError
from rewrite.ir import info

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type["Pass"]] = {}


def option(default: Any = None, help: str = "", **kwargs: Any) -> Any:
    """A pass option: a dataclass field whose help text the CLI shows."""
    if isinstance(default, (list, dict)):
        factory = type(default)
        return dataclasses.field(default_factory=lambda: factory(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


class Pass(PassBase):
    """Base of every rewrite. Subclasses are dataclasses; their fields (see `option`) are the pass's options."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        self.report: dict[str, Any] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def cache_prefix(cls, gm: fx.GraphModule) -> Any:
        """Embeddings `[n, hidden]` this pass put in front of every input of `gm`, or None.

        A KV-cache export (`rewrite.kv_cache`) replays every pass on the model re-captured with a cache,
        except one that returns a prefix here: its tokens enter the cache once, as a constant prefix.
        """
        return None


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes a pass reachable by name from Python, YAML and the CLI."""
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered passes."""
    return sorted(_REGISTRY)


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(pass_class(name))]


def pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        raise RewriteError(f"unknown pass {name!r}; available passes: {', '.join(available())}")
    return _REGISTRY[name]


def create(name: str, **options: Any) -> Pass:
    """A pass by name; unknown options are an error that lists the accepted ones."""
    cls = pass_class(name)
    accepted = option_names(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise RewriteError(
            f"pass {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {', '.join(accepted)}"
        )
    return cls(**options)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _as_pass(spec: Pass | str | tuple[str, dict] | dict) -> Pass:
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return create(spec)
    if isinstance(spec, tuple):
        return create(spec[0], **spec[1])
    if isinstance(spec, dict) and len(spec) == 1:
        (name, options), = spec.items()
        return create(name, **(options or {}))
    raise RewriteError(
        f"pipeline entry {spec!r} is not a pass; write a pass name or a mapping {{name: {{option: value}}}}"
    )


class Pipeline:
    """Passes run in order; after each the graph is linted, recompiled and its history recorded."""

    def __init__(self, passes: Iterable[Pass | str | tuple[str, dict] | dict]):
        self.passes = [_as_pass(p) for p in passes]

    @classmethod
    def from_file(cls, path: str | Path) -> "Pipeline":
        """YAML or JSON: a list of passes, or `{passes: [...]}`; each `name` or `{name: {option: value}}`."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise RewriteError(f"pipeline file {str(path)!r} could not be read: {error}") from error
        if isinstance(data, dict) and "passes" in data:
            data = data["passes"]
        if not isinstance(data, list) or not data:
            raise RewriteError(f"pipeline file {str(path)!r} must hold a non-empty list of passes (or `passes: [...]`)")
        return cls(data)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        for pass_ in self.passes:
            result = pass_(gm)
            gm = result.graph_module if result is not None else gm
            gm.graph.lint()
            gm.recompile()
            info(gm)["history"].append(
                {"pass": pass_.name, "options": _jsonable(pass_.options()), "report": _jsonable(pass_.report)}
            )
            log.info("pass %s: %s", pass_.name, pass_.report.get("summary", "done"))
        return gm


def apply(gm: fx.GraphModule, name: str, **options: Any) -> fx.GraphModule:
    """Runs one registered pass by name (the same names and options as the CLI and pipeline files)."""
    return Pipeline([create(name, **options)]).run(gm)

