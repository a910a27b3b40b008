"""What an exported model carries in its ONNX metadata, as one typed record (`ModelSchema`): every key the
exporter writes (through the writers here) and the runtime reads (only here).

Keys: the task, label names, the text encoding (`encoding_metadata`: a template with prompt slots, or a
cloze pattern; models exported before it was one key keep their three old keys), the position limit,
the positions put before the input's own, heads that never trained, the KV cache's layout and special
ids, and the adapter slots with the base model's fingerprint. The encoding is checked when read: one
this version cannot apply is refused, never skipped, since a model fed its text without its template
scores as if it had none.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rewrite.errors import RewriteError
from rewrite.runtime.cache import CacheLayout
from rewrite.runtime.slots import Slot
from rewrite.text.templates import Template

TASK_KEY, LABELS_KEY, PREPENDED_KEY = "rewrite.task", "rewrite.id2label", "rewrite.prepended_positions"
POSITIONS_KEY, UNTRAINED_KEY = "rewrite.max_positions", "rewrite.untrained_head"
CACHE_KEY, SPECIAL_IDS_KEY = "rewrite.cache", "rewrite.special_ids"
SLOTS_KEY, ENCODING_KEY = "rewrite.adapter_slots", "rewrite.encoding"
TEMPLATE, PATTERN = "template", "pattern"
_LEGACY_TEMPLATE, _LEGACY_IDS, _LEGACY_PATTERN = "rewrite.template", "rewrite.placeholder_ids", "rewrite.pattern"
ENCODING_FIELDS: dict[str, dict[str, type]] = {  # kind -> its fields and their JSON types
    TEMPLATE: {"template": str, "placeholder_ids": list},
    PATTERN: {"pattern": str},
}


@dataclass
class SlotLayout:
    """What a slotted model promises: its slots, whether they are stacked per row, the rank limit, the base."""

    slots: list[Slot]
    mixed: bool
    max_rank: int
    fingerprint: int

    def to_json(self) -> str:
        return json.dumps({"slots": [s.to_json() for s in self.slots], "mixed": self.mixed,
                           "max_rank": self.max_rank, "fingerprint": self.fingerprint})

    @classmethod
    def from_json(cls, text: str) -> "SlotLayout":
        data = json.loads(text)
        return cls([Slot.from_json(s) for s in data["slots"]], data["mixed"], data["max_rank"], data["fingerprint"])

    @classmethod
    def of_model(cls, path: str | Path) -> "SlotLayout":
        """The layout the model's metadata declares; an error for a model without slots."""
        if not Path(path).is_file():
            raise RewriteError(f"model {str(path)!r} does not exist; pass a model exported with --adapter-slots")
        return ModelSchema.read(path).require_slots()

    def by_name(self) -> dict[str, Slot]:
        return {s.name: s for s in self.slots}


# --- writing: the exporter's side


def base_metadata(task: str, labels: dict[int, str], prepended: int, positions: int | None,
                  untrained: list[str]) -> dict[str, str]:
    """What every export writes: the task, label names, positions before the input's own, the position limit
    and heads that never trained."""
    return {TASK_KEY: task, LABELS_KEY: json.dumps({int(k): v for k, v in labels.items()}),
            PREPENDED_KEY: str(prepended), POSITIONS_KEY: str(positions or ""), UNTRAINED_KEY: ", ".join(untrained)}


def encoding_metadata(kind: str, **data: Any) -> dict[str, str]:
    """The entry that tells the runtime to encode text as `kind` with `data` (`ENCODING_FIELDS`)."""
    return {ENCODING_KEY: json.dumps({"kind": kind, **data})}


def cache_metadata(layout: CacheLayout, special_ids: dict[str, Any]) -> dict[str, str]:
    """A cached export's layout and special ids; its outputs hold no virtual positions (they are in the cache)."""
    return {CACHE_KEY: json.dumps(dataclasses.asdict(layout)), SPECIAL_IDS_KEY: json.dumps(special_ids),
            PREPENDED_KEY: "0"}


def slots_metadata(layout: SlotLayout) -> dict[str, str]:
    return {SLOTS_KEY: layout.to_json()}


# --- reading: the runtime's side


@dataclass
class ModelSchema:
    """Everything an exported model's metadata says, typed; `origin` names the file in messages."""

    origin: str
    task: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    encoding: dict[str, Any] | None = None
    max_positions: int | None = None
    prepended: int = 0
    untrained: tuple[str, ...] = ()
    cache: CacheLayout | None = None
    special_ids: dict[str, Any] | None = None
    slots: SlotLayout | None = None

    @classmethod
    def read(cls, path: str | Path) -> "ModelSchema":
        return cls.from_props(_parsed(Path(path)).props, str(path))

    @classmethod
    def from_props(cls, props: dict[str, str], origin: str) -> "ModelSchema":
        """The record for raw metadata `props` (what `onnx` or ONNX Runtime's model metadata hold)."""
        return cls(origin, task=props.get(TASK_KEY, ""),
                   labels={int(k): v for k, v in json.loads(props.get(LABELS_KEY) or "{}").items()},
                   encoding=_encoding(props, origin),
                   max_positions=int(props[POSITIONS_KEY]) if props.get(POSITIONS_KEY) else None,
                   prepended=int(props.get(PREPENDED_KEY) or 0),
                   untrained=tuple(filter(None, props.get(UNTRAINED_KEY, "").split(", "))),
                   cache=CacheLayout(**json.loads(props[CACHE_KEY])) if CACHE_KEY in props else None,
                   special_ids=json.loads(props[SPECIAL_IDS_KEY]) if SPECIAL_IDS_KEY in props else None,
                   slots=SlotLayout.from_json(props[SLOTS_KEY]) if SLOTS_KEY in props else None)

    def require_cache(self) -> CacheLayout:
        if self.cache is None:
            raise RewriteError(
                f"model {self.origin!r} (task {self.task or 'unknown'}) was not exported with a KV cache; generation "
                "needs a causal language model exported with `rewrite export X.pt2 --onnx model.onnx --with-cache`")
        return self.cache

    def require_slots(self) -> SlotLayout:
        if self.slots is None:
            raise RewriteError(f"model {self.origin!r} has no adapter slots; export it with --adapter-slots "
                               "(rewrite export X.pt2 --onnx base.onnx --adapter-slots)")
        return self.slots


@dataclass(frozen=True)
class _Parsed:
    """What serving reads from a model file: its metadata and its slots' no-adapter values."""

    props: dict[str, str]
    slot_defaults: dict[str, np.ndarray]


def _parsed(path: Path) -> _Parsed:
    """The model at `path`, parsed once per version of the file: a model with inline weights costs a parse of
    all of them (seconds and the model's size in memory on a large one), and serving asks several times."""
    stat = path.stat() if path.is_file() else None
    return _parse(str(path), stat and (stat.st_ino, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _parse(path: str, _version: tuple[int, int, int] | None) -> _Parsed:
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise RewriteError(f"{path!r} is not an ONNX model ({type(error).__name__}); give the .onnx file "
                           "that `rewrite export` wrote") from error
    if not model.graph.input:
        raise RewriteError(f"{path!r} is not an ONNX model with inputs; give the .onnx file that "
                           "`rewrite export` wrote")
    props = {p.key: p.value for p in model.metadata_props}
    slots = {s.name for s in SlotLayout.from_json(props[SLOTS_KEY]).slots} if SLOTS_KEY in props else set()
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in slots}
    return _Parsed(props, defaults)


def slot_defaults(path: str | Path) -> dict[str, np.ndarray]:
    """Each slot's no-adapter value as the model holds it (a mixed model's stacked `[1, ...]`)."""
    return _parsed(Path(path)).slot_defaults


def _json(text: str | None) -> Any:
    """`text` read as JSON; None when it is not."""
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _legacy(props: dict[str, str]) -> dict[str, Any] | None:
    """The encoding of a model exported before it was one key (a template wins, as it did)."""
    if _LEGACY_TEMPLATE in props:
        return {"kind": TEMPLATE, "template": props[_LEGACY_TEMPLATE], "placeholder_ids": _json(props.get(_LEGACY_IDS))}
    if _LEGACY_PATTERN in props:
        return {"kind": PATTERN, "pattern": props[_LEGACY_PATTERN]}
    return None


def _encoding(props: dict[str, str], origin: str) -> dict[str, Any] | None:
    """The encoding the metadata names (None: plain tokenization); one this version cannot apply is an error."""
    encoding = _json(props[ENCODING_KEY]) if ENCODING_KEY in props else _legacy(props)
    if encoding is None and ENCODING_KEY not in props:
        return None
    if not isinstance(encoding, dict) or not isinstance(encoding.get("kind"), str):
        raise RewriteError(f"{origin!r} has a {ENCODING_KEY} in its metadata that is not a JSON object naming its "
                           "kind; re-export the model with `rewrite export`")
    if encoding["kind"] not in ENCODING_FIELDS:
        raise RewriteError(f"{origin!r} needs text encoding {encoding['kind']!r}, which this version of rewrite cannot "
                           f"apply (it knows {', '.join(sorted(ENCODING_FIELDS))}); serve it with the version that "
                           "exported it or re-export it with this one")
    _check(encoding, origin)
    return encoding


def _check(encoding: dict[str, Any], origin: str) -> None:
    """An encoding of a known kind holds its fields, and they fit together."""
    for name, kind in ENCODING_FIELDS[encoding["kind"]].items():
        if not isinstance(encoding.get(name), kind):
            _malformed(encoding, origin, f"its {name!r} is not a JSON {'string' if kind is str else 'list'}")
    if encoding["kind"] != TEMPLATE:
        return
    ids, template = encoding["placeholder_ids"], Template.parse(encoding["template"], prompts=False)
    if not template.prompt_count or not template.fields:
        _malformed(encoding, origin, "its template lacks a [P] slot or a {text} field")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        _malformed(encoding, origin, "its 'placeholder_ids' are not all token ids")
    if len(ids) != template.prompt_count:
        _malformed(encoding, origin, f"its template has {template.prompt_count} [P] slots but {len(ids)} "
                   "placeholder ids")


def _malformed(encoding: dict[str, Any], origin: str, problem: str) -> None:
    raise RewriteError(f"{origin!r} has a malformed {encoding['kind']} encoding in its metadata ({problem}); "
                       "re-export the model with `rewrite export`")
