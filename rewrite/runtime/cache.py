"""The KV cache as the exported model takes it: its layout (from the model's metadata), the feeds of one
step, an empty past for the prefill, and the positions of padded rows.

Rows are padded on the right (ONNX Runtime GenAI's convention, the only one GroupQueryAttention reads: it takes
each row's length from the mask), except on a model that numbers positions from its cache length (a prompt-tuned
prefix) or slides its attention window over cache slots (an unlowered sliding-window model), where padding inside
the row would shift what follows it: those pad on the left, as models exported before `padding` was recorded do."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def feed(layout: CacheLayout, input_ids, attention_mask, position_ids, past) -> dict:
    """ONNX Runtime's inputs for one step: the cache's tensors under their input names."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if layout.position_ids:
        inputs["position_ids"] = position_ids
    inputs.update(zip(layout.past_names(), past))
    return inputs


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
