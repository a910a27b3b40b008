"""The pass protocol, the registry and the pipeline.

A pass is a dataclass of options that follows `torch.fx.passes.infra`'s `PassBase` protocol
(`call(gm) -> PassResult`), so it also runs under PyTorch's own `PassManager`. The pipeline lints
and recompiles after each pass and records the pass, its options and its report in the graph's
history (`info(gm).history`), so a saved graph says how it was made.

A pass is also the only place that knows what it did. The engine walks the graph's history and asks
each pass class that has a capability; it never names a pass. A capability is a `typing.Protocol`
defined beside the code that consumes it, and a pass opts in by defining its methods (`implements`):

- PEFT adapter files (`rewrite.adapters.peft_files`): `PeftWriter.adapter_files`, `PeftReader`'s
  `peft_types` + `from_adapter` (and `accepts`, for variants of one PEFT type).
- fold (`passes/fold.py`): `Foldable.fold(gm, runs) -> Folded`: merge what the pass added into constants.
- ONNX adapter slots (`rewrite.adapters.slots`): `SlotProvider.adapter_slots`, `SlotPreparer.prepare_slots`,
  `SlotValues.slot_values`: the tensors an export exposes as inputs that adapter files fill, how the
  exported copy reads them, and a PEFT adapter's tensors as slot values.
- serving metadata (`rewrite.export.onnx`): `ServingMetadata.serving_metadata`, such as how serving
  encodes its text (`rewrite.runtime.encoding`: data the runtime reads without asking any pass).
- cache prefix (`rewrite.export.kv_cache`): `CachePrefix.cache_prefix`, embeddings the pass put in front
  of every input, which an export with a KV cache turns into a constant cache prefix.
- training speed (`rewrite.training.speed`): a `speed = SpeedPass(...)` declaration.

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
from typing import Any, ClassVar, Iterable

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
    def __post_init__(self) -> None:
        self.report: dict[str, Any] = {}
        check_choices(self)  # once, when the pass is created

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def restore(cls, record: dict[str, Any]) -> "Pass":
        """The pass as it ran, from its history record: created from its options (checked and normalized as when it
        ran; not run again), with its report."""
        names = {f.name for f in dataclasses.fields(cls)}
        restored = cls(**{key: value for key, value in record["options"].items() if key in names})
        restored.report = dict(record.get("report") or {})
        return restored


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


def implements(cls: type, capability: type) -> bool:
    """Whether `cls` has every method and class attribute the capability protocol declares."""
    members = [name for name in vars(capability) if not name.startswith("_")]
    members += list(getattr(capability, "__annotations__", {}))
    return all(hasattr(cls, name) for name in members)


def capable(gm: fx.GraphModule, capability: type) -> list[tuple[type[Pass], list[Pass]]]:
    """`applied(gm)`, only the pass classes that implement `capability`."""
    return [(cls, runs) for cls, runs in applied(gm) if implements(cls, capability)]


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


def _jsonable(value: Any, where: str | None = None) -> Any:
    """`value` as JSON data. Options may hold other values (a path), recorded as text; a report is what hooks
    read back, so anything but JSON data there (`where` names it) is the pass's bug, raised, never turned to
    text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if where is not None:
        raise TypeError(f"{where} holds {type(value).__name__} {value!r}, which is not JSON data")
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
                {"pass": pass_.name, "options": _jsonable(pass_.options()), "report": _jsonable(pass_.report, f"the report of pass {pass_.name!r}"),
                 "modified": result is None or bool(result.modified)}
            )
            log.info("pass %s: %s", pass_.name, pass_.report.get("summary", "done"))
        return gm


def apply(gm: fx.GraphModule, name: str, **options: Any) -> fx.GraphModule:
    """Runs one registered pass by name (the same names and options as the CLI and pipeline files)."""
    return Pipeline([create(name, **options)]).run(gm)
