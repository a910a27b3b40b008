"""The KV cache as the exported model takes it: its layout (from the model's metadata), the feeds of one
step, the cache of one generation run, and the positions of padded rows.

A run's cache is copied (`CopiedCache`: the past fed whole and replaced by the presents each step, which any
cached export runs) or held in place (`InPlaceCache`, a model lowered onto GroupQueryAttention in every layer: one
buffer per key and value at the run's full length, bound as both past and present, the op appending each step's
keys and values into it as ONNX Runtime GenAI's `past_present_share_buffer` does), so no step copies the past.
A run with adapter inputs or an active adapter file is copied: ONNX Runtime's bound runs take neither; so is a run
on a GPU provider, whose in-place buffers would have to live in device memory.

Rows are padded on the right (ONNX Runtime GenAI's convention, the only one GroupQueryAttention reads: it takes
each row's length from the mask), except on a model that numbers positions from its cache length (a prompt-tuned
prefix) or slides its attention window over cache slots (an unlowered sliding-window model), where padding inside
the row would shift what follows it: those pad on the left, as models exported before `padding` was recorded do."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class CacheLayout:
    """What a caller needs to run the cached model: written into the ONNX metadata."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    position_ids: bool
    prefix: int
    padding: str = "left"  # which side of a row its padding goes
    in_place: bool = False  # past and present may be one buffer (GroupQueryAttention in every layer)

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def step_feed(layout: CacheLayout, input_ids, attention_mask, position_ids) -> dict:
    """ONNX Runtime's inputs for one step, the cache's tensors aside."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if layout.position_ids:
        inputs["position_ids"] = position_ids
    return inputs


def feed(layout: CacheLayout, input_ids, attention_mask, position_ids, past) -> dict:
    """ONNX Runtime's inputs for one step: the cache's tensors under their input names."""
    return step_feed(layout, input_ids, attention_mask, position_ids) | dict(zip(layout.past_names(), past))


def empty_past(layout: CacheLayout, batch: int) -> list[np.ndarray]:
    """Past length 0: the prefill step of the merged model."""
    shape = (batch, layout.kv_heads, 0, layout.head_dim)
    return [np.zeros(shape, dtype=layout.dtype) for _ in layout.past_names()]


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of padded rows as Hugging Face's `generate` counts them: `cumsum(mask) - 1`, 0 at padding."""
    return np.where(mask == 0, 0, mask.cumsum(-1) - 1)


def last_real(mask: np.ndarray) -> np.ndarray:
    """Each row's last real position among the mask's last columns `[batch, sequence]` (padded on either side)."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)


LAST_ONLY = "last_logits_only"  # a lowered model's optional input: logits of each row's last real token only


def keeps_last(session: ort.InferenceSession) -> bool:
    """Whether the model can compute the logits of each row's last real token only (its optional `LAST_ONLY`
    input): fed true in a step of several tokens (a prefill), the head runs on one position per row, not all."""
    return LAST_ONLY in {i.name for i in session.get_overridable_initializers()}


def last_only_feed(tokens: int) -> dict[str, np.ndarray]:
    """`LAST_ONLY` for a step of `tokens` tokens: true in a prefill, false in a decoding step (one position anyway)."""
    return {LAST_ONLY: np.asarray(tokens > 1)}


class CopiedCache:
    """The past as arrays: fed whole each step and replaced by the presents."""

    def __init__(self, session: ort.InferenceSession, layout: CacheLayout, rows: int, extra: dict | None = None,
                 options: ort.RunOptions | None = None, last_only: bool = True):
        self.session, self.layout, self.extra, self.options = session, layout, extra or {}, options
        self.last_only = last_only and keeps_last(session)
        self.past = empty_past(layout, rows)
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """The step's logits: `[batch, tokens, vocab]`, or `[batch, 1, vocab]` at each row's last real token when
        `last_only` and the model can; the cache then holds the step's keys and values."""
        last = last_only_feed(ids.shape[1]) if self.last_only else {}
        feeds = feed(self.layout, ids, mask, position_ids, self.past) | self.extra | last
        values = dict(zip(self.outputs, self.session.run(self.outputs, feeds, self.options)))
        self.past = [values[name] for name in self.layout.present_names()]
        return values["logits"]


class InPlaceCache(CopiedCache):
    """Each layer's key and value in one buffer of `capacity` positions, bound as the past input and the present
    output of every decoding step (see the module docstring). The prefill runs as `CopiedCache` (ONNX Runtime
    cannot bind an initializer-backed input such as `LAST_ONLY`) and its keys and values are copied in once."""

    def __init__(self, session: ort.InferenceSession, layout: CacheLayout, rows: int, capacity: int,
                 extra: dict | None = None, options: ort.RunOptions | None = None, last_only: bool = True):
        super().__init__(session, layout, rows, extra, options, last_only)
        shape = (rows, layout.kv_heads, capacity, layout.head_dim)
        self.arrays = [np.zeros(shape, dtype=layout.dtype) for _ in layout.past_names()]
        self.binding = session.io_binding()
        for past, present, array in zip(layout.past_names(), layout.present_names(), self.arrays):
            buffer = ort.OrtValue.ortvalue_from_numpy(array)  # over the array's memory
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)
        self._bind(self.extra)

    def _bind(self, arrays: dict[str, np.ndarray]) -> None:
        """Binds inputs (the binding keeps each array alive while it is bound)."""
        for name, array in arrays.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(array))

    def run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """As `CopiedCache.run`; the buffers then hold the step's keys and values."""
        if self.past is not None:
            logits = super().run(ids, mask, position_ids)
            for array, present in zip(self.arrays, self.past):
                array[:, :, :present.shape[2]] = present
            self.past, self.vocab, self.dtype = None, logits.shape[2], logits.dtype
            return logits
        self._bind(step_feed(self.layout, ids, mask, position_ids))
        # a new array each step, bound as the output: the caller may keep it, and asking ONNX Runtime for its
        # outputs instead would wrap every bound buffer anew (the allocator reuses the last step's freed memory)
        logits = np.empty((*ids.shape, self.vocab), dtype=self.dtype)
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(self.binding, self.options)
        return logits


def open_cache(session: ort.InferenceSession, layout: CacheLayout, rows: int, capacity: int,
               extra: dict | None = None, options: ort.RunOptions | None = None,
               last_only: bool = True) -> CopiedCache | InPlaceCache:
    """The cache of one run of `rows` rows and at most `capacity` positions (`extra`: constant feeds, such as
    adapter inputs; `last_only`: let the prefill compute each row's last logits only, where the model can), held
    in place where the model allows it."""
    inputs = {i.name for i in session.get_inputs()}
    # ONNX Runtime binds no initializer-backed input (adapter slots) and applies no active adapter to a bound run;
    # the buffers are host memory, which only the CPU provider writes in place
    on_cpu = session.get_providers()[0] == "CPUExecutionProvider"
    if layout.in_place and on_cpu and options is None and set(extra or {}) <= inputs:
        return InPlaceCache(session, layout, rows, capacity, extra, options, last_only)
    return CopiedCache(session, layout, rows, extra, options, last_only)
