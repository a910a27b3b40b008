"""The pass protocol, the registry and the pipeline.

A pass is a dataclass of options that follows `torch.fx.passes.infra`'s `PassBase` protocol
(`call(gm) -> PassResult`), so it also runs under PyTorch's own `PassManager`. The pipeline lints
and recompiles after each pass and records the pass, its options and its report in the graph's
history (`info(gm).history`), so a saved graph says how it was made.

A pass is also the only place that knows what it did. The engine (adapter files, export, `run`,
fold) walks the graph's history and asks each pass class through the hooks below; it never names a
pass. Every hook has a default that does nothing, so a new pass overrides only what it needs:

- `adapter_files(gm, runs)`: the PEFT adapter (config + tensors) its runs amount to, or None;
  `peft_types` + `from_adapter(gm, config, weights, origin)`: the way back, from a PEFT adapter.
- `serving_metadata(gm, runs)`: what export writes into the ONNX model's metadata, such as how serving
  encodes its text (`rewrite.serve.encoding`: data the runtime reads without asking any pass).
- `fold(gm, runs) -> Folded`: merge what the pass added into constants (the fold pass asks every pass).
- `adapter_slots(gm, runs)`, `prepare_slots(gm, runs)`, `slot_values(config, weights)`: the tensors an
  ONNX export exposes as inputs that adapter files fill, how the exported copy reads them, and a PEFT
  adapter's tensors as slot values (`rewrite.adapters.slots`).
- `cache_prefix(gm, runs)`: embeddings the pass put in front of every input, which an export with a KV
  cache turns into a constant cache prefix instead of replaying the pass (`rewrite.export.kv_cache`).

How text becomes input ids, and what else the graph now is (task, trainable parameters,
prepended positions, an input template), a pass writes into the typed `GraphInfo`.
`runs` are the pass's runs on this graph, rebuilt from the history (`Pass.restore`).
"""
from __future__ import annotations

import dataclasses
import logging
from importlib.metadata import entry_points
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import yaml
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from rewrite.errors import RewriteError
from rewrite.graph.ir import info
from rewrite.graph.transaction import all_or_nothing
from rewrite.graph.options import check_choices, option  # noqa: F401  (`option` is how passes declare options)

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type["Pass"]] = {}
PLUGIN_GROUP = "rewrite.passes"  # packages whose import registers passes (the built-in ones: `passes/`)
_plugins_loaded = False


@dataclass(frozen=True)
class AdapterFiles:
    """One PEFT adapter: `adapter_config.json`'s content and `adapter_model.safetensors`' tensors."""

    config: dict[str, Any]
    tensors: dict[str, Any]


@dataclass(frozen=True)
class Folded:
    """What a pass folded: the report key the fold pass lists it under, the items, and a summary phrase."""

    key: str
    items: list[str]
    summary: str


class Pass(PassBase):
    """Base of every rewrite. Subclasses are dataclasses; their fields (see `option`) are the pass's options.

    `name` is how Python, pipeline files and the CLI call it; `title` how messages name it.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    peft_types: ClassVar[tuple[str, ...]] = ()  # PEFT adapter types `from_adapter` applies
    def __post_init__(self) -> None:
        self.report: dict[str, Any] = {}
        check_choices(self)  # once, when the pass is created

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def restore(cls, record: dict[str, Any]) -> "Pass":
        """The pass as it ran, from its history record (options and report); not checked or run again."""
        restored = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in record["options"]:
                value = record["options"][f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()
            setattr(restored, f.name, value)
        restored.report = dict(record.get("report") or {})
        return restored

    # ---- what the pass means to the rest of the system (hooks; the defaults do nothing)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["Pass"]) -> AdapterFiles | None:
        """The PEFT adapter these runs amount to; raise RewriteError if PEFT cannot express them."""
        return None

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        """Whether this pass applies a PEFT adapter `config` of one of its `peft_types` (variants of one type
        tell theirs apart by config fields)."""
        return True

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, Any],
                     origin: str) -> dict[str, str]:
        """Runs this pass as a PEFT adapter of one of `peft_types` describes; returns, per graph tensor
        name, the adapter key whose weight the engine copies into it."""
        raise RewriteError(f"pass {cls.name!r} does not load PEFT adapters")

    @classmethod
    def serving_metadata(cls, gm: fx.GraphModule, runs: Sequence["Pass"]) -> dict[str, str]:
        """ONNX metadata a caller needs to feed the exported model (keys `rewrite.*`)."""
        return {}

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["Pass"]) -> Folded | None:
        """Merges what the runs added into the base graph's constants; None when there was nothing to fold."""
        return None

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence["Pass"]) -> list[Any]:
        """The graph tensors an ONNX export exposes as named inputs that adapter files fill, as
        `rewrite.adapters.slots.Slot`s (none by default; trained tensors no pass claims become slots too)."""
        return []

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence["Pass"]) -> None:
        """Rewrites `gm`, a copy the slot export owns, so each slot's tensor is all its input replaces (LoRA
        drops the multiplier its B slot carries; a prompt encoder becomes its table). Nothing by default."""

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
        """A PEFT adapter of one of `peft_types` as the tensors that fill this pass's slots (and its head's)."""
        raise RewriteError(f"pass {cls.name!r} does not convert PEFT adapters for adapter slots")

    @classmethod
    def cache_prefix(cls, gm: fx.GraphModule, runs: Sequence["Pass"]) -> Any:
        """Embeddings `[n, hidden]` the runs put in front of every input of `gm`, or None.

        A KV-cache export replays every pass on the model re-captured with a cache, except one that
        returns a prefix here: its tokens enter the cache once, as a constant prefix.
        """
        return None


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes a pass reachable by name from Python, YAML and the CLI."""
    if not cls.title:
        cls.title = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    """Imports every package the `rewrite.passes` entry points name, once, so its passes register: the engine
    finds the built-in passes, and any installed package's, without naming them."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for plugin in entry_points(group=PLUGIN_GROUP):
            plugin.load()


def available() -> list[str]:
    """Names of the registered passes."""
    _load_plugins()
    return sorted(_REGISTRY)


def registered() -> list[type[Pass]]:
    """The registered pass classes, in registration order."""
    _load_plugins()
    return list(_REGISTRY.values())


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(pass_class(name))]


def pass_class(name: str) -> type[Pass]:
    _load_plugins()
    if name not in _REGISTRY:
        raise RewriteError(f"unknown pass {name!r}; available passes: {', '.join(available())}")
    return _REGISTRY[name]


def applied(gm: fx.GraphModule) -> list[tuple[type[Pass], list[Pass]]]:
    """Each pass class in the graph's history with its runs (restored from the records, in order).
    Classes come in registration order, so what the engine builds from them does not depend on the
    order the passes ran in."""
    runs: dict[str, list[Pass]] = {}
    for record in info(gm).history:
        runs.setdefault(record["pass"], []).append(pass_class(record["pass"]).restore(record))
    return [(cls, runs[cls.name]) for cls in registered() if cls.name in runs]


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
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise RewriteError(f"pipeline file {str(path)!r} could not be read: {error}") from error
        if isinstance(data, dict) and "passes" in data:
            data = data["passes"]
        if not isinstance(data, list) or not data:
            raise RewriteError(f"pipeline file {str(path)!r} must hold a non-empty list of passes (or `passes: [...]`)")
        return cls(data)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        """All or nothing: if a pass fails, the graph is left as it was before the first."""
        with all_or_nothing(gm):
            return self._run(gm)

    def _run(self, gm: fx.GraphModule) -> fx.GraphModule:
        for pass_ in self.passes:
            result = pass_(gm)
            gm = result.graph_module if result is not None else gm
            gm.graph.lint()
            gm.recompile()
            info(gm).history.append(
                {"pass": pass_.name, "options": _jsonable(pass_.options()), "report": _jsonable(pass_.report),
                 "modified": result is None or bool(result.modified)}
            )
            log.info("pass %s: %s", pass_.name, pass_.report.get("summary", "done"))
        return gm


def apply(gm: fx.GraphModule, name: str, **options: Any) -> fx.GraphModule:
    """Runs one registered pass by name (the same names and options as the CLI and pipeline files)."""
    return Pipeline([create(name, **options)]).run(gm)
