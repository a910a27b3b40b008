"""Adapter slots as data: what an exported model declares about each tensor adapter files fill (`Slot`; the
model's whole layout is `rewrite.runtime.schema.SlotLayout`), the names their inputs carry, and how several
adapters stack for a mixed model. Training (`rewrite.adapters.slots`) and the runtime share these, so both read
a slot one way."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

INDEX = "adapter_index"
RANK = None  # a slot shape's dynamic rank axis


@dataclass(frozen=True)
class Slot:
    """One named adapter tensor, as the method that owns it declares it: its shape (None marks the rank axis),
    dtype, its value when no adapter fills it (`empty`: zeros, at rank 0 on a rank axis; ones, for a
    multiplier; the graph's current value, e.g. a head's; or the name of another tensor of the prepared copy
    that holds it, e.g. DoRA's base-weight norms), the scale the graph applies to it, which the slot's value
    carries instead, its group: the slots one adapter fills together (a branch's A and B), whose ranks
    agree, and, for a slot whose method has no per-row form, the one sentence a mixed export refuses with."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    empty: str = "current"
    scale: float = 1.0
    group: str | None = None
    no_per_row: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> "Slot":
        """A slot from model metadata; models exported before slots declared `empty` and `group` name a `kind`."""
        data = {**data, "shape": tuple(data["shape"])}
        kind = data.pop("kind", None)
        if kind not in (None, "tensor"):  # a branch's factor
            data.update(empty="zeros", group=data["name"].rsplit(".", 2)[0])
        return cls(**data)

    def fits(self, shape: tuple[int, ...], max_rank: int) -> str | None:
        """Why a tensor of `shape` cannot fill this slot, or None when it can."""
        if len(shape) != len(self.shape) or any(want is not None and want != got for want, got in zip(self.shape, shape)):
            wanted = "x".join("rank" if d is None else str(d) for d in self.shape)
            return f"has shape {tuple(shape)} but the model's slot is [{wanted}]"
        rank = self.rank(shape)
        if rank is not None and rank > max_rank:
            return f"has rank {rank}, above the model's slot limit of {max_rank}"
        return None

    def rank(self, shape: tuple[int, ...]) -> int | None:
        return next((got for want, got in zip(self.shape, shape) if want is None), None)

    def to_json(self) -> dict:
        return asdict(self)


def python_name(name: str) -> str:
    """The keyword a slot's input has in the graph's Python signature (ONNX gets the real name back)."""
    return name if name == INDEX else "slot__" + name.replace(".", "__")


def stack(slot_list: Sequence[Slot], adapters: Sequence[Mapping[str, np.ndarray]],
          fallback: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stacked slot inputs `[N, ...]` for `adapters` (each slot's ranks zero-padded to the largest; a slot
    an adapter lacks takes `fallback`'s value), keyed by slot name."""
    stacked = {}
    for slot in slot_list:
        rows = [np.asarray(a.get(slot.name, fallback[slot.name])) for a in adapters]
        if RANK in slot.shape:
            axis = slot.shape.index(RANK)
            rank = max(r.shape[axis] for r in rows)
            rows = [np.pad(r, [(0, rank - r.shape[axis]) if d == axis else (0, 0) for d in range(r.ndim)])
                    for r in rows]
        stacked[slot.name] = np.stack(rows)
    return stacked
