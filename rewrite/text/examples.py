"""Examples as text and as token ids, and how id rows are padded: what reading data, training, templates and
serving share, so a batch is padded one way everywhere (as numpy arrays; training makes tensors of them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Example:
    """One validated row; `where` is `file:line` (or `row N` for in-memory rows), for messages."""

    text: str
    pair: str | None
    label: int | tuple[float, ...] | None
    where: str


@dataclass
class TokenizedExamples:
    """Tokenized examples: token ids per example (unpadded) and the labels, ready to batch.

    `reserved` are ids that stand for something other than a token (P-tuning's placeholders): they
    are never language-modeling targets and never masked.
    """

    features: list[dict[str, list[int]]]
    labels: list[int | tuple[float, ...]] | None
    truncated: int
    reserved: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.features)

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def pad_token_id(tokenizer) -> int:
    """The pad token, else EOS (LLaMA and GPT-2 tokenizers have no pad token); the mask hides it anyway."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def pad_rows(rows: list[list[int]], value: int, left: bool) -> np.ndarray:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
    return np.asarray(padded, dtype=np.int64)


def pad_ids(rows: Sequence[Sequence[int]], tokenizer) -> dict[str, np.ndarray]:
    """`input_ids` (pad token, on the tokenizer's padding side) and `attention_mask` for unpadded id rows."""
    left = getattr(tokenizer, "padding_side", "right") == "left"
    return {"input_ids": pad_rows([list(r) for r in rows], pad_token_id(tokenizer), left),
            "attention_mask": pad_rows([[1] * len(r) for r in rows], 0, left)}
