"""Adapter files at run time: the slots an exported model declares (`SlotLayout`, from its metadata),
ONNX Runtime adapter files (`.onnx_adapter`) checked against them, one file active through ONNX Runtime's
`LoraAdapter`, or several stacked for a mixed model with one `adapter_index` per row (`Adapters`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rewrite.errors import RewriteError
from rewrite.runtime.schema import ModelSchema, SlotLayout, slot_defaults
from rewrite.runtime.slots import INDEX, RANK, stack

def check(values: dict[str, np.ndarray], layout: SlotLayout, source: str) -> None:
    """Raises naming the first tensor that does not fit the model's slots (name, shape, rank limit, dtype)."""
    slots = layout.by_name()
    for name, value in values.items():
        if name not in slots:
            raise RewriteError(f"adapter {source!r} has tensor {name}, which names no slot of this model; "
                               "the adapter was made for another base model (or the model was exported without "
                               "that LoRA target)")
        why = slots[name].fits(tuple(value.shape), layout.max_rank)
        if why is None and str(value.dtype) != slots[name].dtype:
            why = f"has dtype {value.dtype} but the model's slot holds {slots[name].dtype}"
        if why is not None:
            raise RewriteError(f"adapter {source!r} tensor {name} {why}")
    groups: dict[str, list[str]] = {}
    for slot in slots.values():
        if slot.group is not None:
            groups.setdefault(slot.group, []).append(slot.name)
    for members in groups.values():
        given = [name for name in members if name in values]
        if given and len(given) < len(members):
            missing = next(name for name in members if name not in values)
            raise RewriteError(f"adapter {source!r} has {given[0]} without {missing}; the tensors of one adapted "
                               "module come together")
        ranks = {name: slots[name].rank(values[name].shape) for name in given if RANK in slots[name].shape}
        if len(set(ranks.values())) > 1:
            first, second = list(ranks)[:2]
            raise RewriteError(f"adapter {source!r} has ranks that differ between {first} and {second}")


def read_adapter(path: str | Path, layout: SlotLayout) -> dict[str, np.ndarray]:
    """An `.onnx_adapter` file's tensors, checked against the model's slots and base fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise RewriteError(f"adapter file {str(path)!r} does not exist; make one with rewrite adapter export")
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
    except Exception as error:  # ORT raises its own Fail/RuntimeError types; its text (a C++ source path) shows with -v
        raise RewriteError(f"{str(path)!r} is not an ONNX Runtime adapter file (ONNX Runtime cannot read it); make one "
                           "with `rewrite adapter export`") from error
    if adapter.get_model_version() != layout.fingerprint:
        raise RewriteError(f"adapter {str(path)!r} was made for another base model (its base fingerprint "
                           f"{adapter.get_model_version()} is not this model's {layout.fingerprint})")
    values = {name: value.numpy().copy() for name, value in adapter.get_parameters().items()}  # outlive `adapter`
    check(values, layout, str(path))
    return values


def stacked_feeds(files: list[str | Path], model: str | Path, index: list[int]) -> dict[str, np.ndarray]:
    """The mixed model's inputs for `files` (ranks zero-padded to the largest) and one adapter index per row."""
    layout = SlotLayout.of_model(model)
    if not layout.mixed:
        raise RewriteError(f"model {str(model)!r} serves one adapter at a time; export it with --mixed-adapters "
                           "for per-row adapters")
    bad = [i for i in index if not 0 <= i < len(files)]
    if bad:
        raise RewriteError(f"adapter index {bad[0]} is out of range for {len(files)} adapters; use 0 to {len(files) - 1}")
    adapters = [read_adapter(f, layout) for f in files]
    defaults = {name: value[0] for name, value in slot_defaults(model).items()}
    return stack(layout.slots, adapters, defaults) | {INDEX: np.asarray(index, dtype=np.int64)}


def active(path: str | Path, model: str | Path) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    """Run options with the checked adapter file active, as ONNX Runtime's LoraAdapter serves it (keep the
    adapter alive while the options are in use)."""
    layout = SlotLayout.of_model(model)
    if layout.mixed:
        raise RewriteError(f"model {str(model)!r} takes stacked adapters; pass them with --adapters")
    read_adapter(path, layout)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


@dataclass
class Adapters:
    """Which adapter files serve a run: one active file, or several stacked with an adapter index per row."""

    active: str | None = None
    stacked: list[str] = field(default_factory=list)
    index: list[int] | None = None

    @classmethod
    def parse(cls, active: str | None, stacked: str | None, index: str | None, rows: int) -> "Adapters":
        """From the CLI's `--adapter`, `--adapters a,b,...` and `--adapter-index 0,1,...` (default: cycling)."""
        files = [f for f in (stacked or "").split(",") if f]
        if active and files:
            raise RewriteError("give either --adapter FILE or --adapters FILE,FILE,..., not both")
        if index is not None and not files:
            raise RewriteError("--adapter-index picks among --adapters; give the adapter files too")
        if index is None:
            return cls(active, files, [i % len(files) for i in range(rows)] if files else None)
        try:
            picks = [int(i) for i in index.split(",")]
        except ValueError:
            raise RewriteError(f"--adapter-index {index!r} is not a comma-separated list of whole numbers") from None
        if len(picks) != rows:
            raise RewriteError(f"--adapter-index gives {len(picks)} indices for {rows} texts; give one per text")
        return cls(active, files, picks)

    def carried_modules(self, model: str | Path) -> set[str]:
        """The modules every adapter file of this run carries tensors of (a trained head): every row runs
        their trained values rather than the model's defaults."""
        files = [self.active] if self.active else self.stacked
        if not files:
            return set()
        layout = SlotLayout.of_model(model)
        return set.intersection(*({name.rpartition(".")[0] for name in read_adapter(f, layout)} for f in files))

    def run_inputs(self, model: str | Path, rows: int) -> tuple[dict[str, np.ndarray], ort.RunOptions | None, object]:
        """Extra feeds, run options and the loaded adapter to keep alive while they are in use."""
        if self.active:
            options, adapter = active(self.active, model)
            return {}, options, adapter
        if self.stacked:
            return stacked_feeds(self.stacked, model, self.index), None, None
        slots = ModelSchema.read(model).slots
        if slots is not None and slots.mixed:
            return {INDEX: np.zeros(rows, dtype=np.int64)}, None, None  # every row on the defaults: the base
        return {}, None, None
