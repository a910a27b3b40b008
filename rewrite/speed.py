"""The graph `rewrite.train` steps through: a copy of the user's graph rewritten for training speed.

The speed passes run on a twin of the graph that shares its parameters, so the user's graph (its
evaluation, saved archive, fold and export) is untouched. `SPEED_PASSES` are the exact ones, applied
by default: `chunked_loss` (language models: the loss applies the head, no full logits),
`rows` (`[CLS]`-pooled classifiers compute their last block on that row; not when the run keeps
Hugging Face's dropout masks bit for bit), `fused_lora` (one A matmul per shared input),
`checkpoint` (opt-in: per-block activation checkpointing). `dense_attention` makes a second twin
for batches without padding, so those run without a materialized mask; `Graphs` picks per batch.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Sequence

import torch
from torch import fx, nn

from rewrite.ir import info, wrap
from rewrite.pipeline import Pipeline, pass_class

SPEED_PASSES = ("chunked_loss", "rows", "fused_lora", "dense_attention")


class Graphs(nn.Module):
    """The training graph, and where exact a variant for batches without padding, sharing parameters."""

    def __init__(self, general: fx.GraphModule, unpadded: fx.GraphModule | None, compile: bool):
        super().__init__()
        self.general = general
        self.unpadded = unpadded
        self._general = torch.compile(general) if compile else general
        self._unpadded = torch.compile(unpadded) if compile and unpadded is not None else unpadded

    def forward(self, **inputs: torch.Tensor):
        mask = inputs.get("attention_mask")
        padded = self.unpadded is None or mask is None or not bool(mask.all())
        return (self._general if padded else self._unpadded)(**inputs)


def resolve(names: Sequence[str] | None, *, dropout_parity: bool, custom_loss: bool,
            checkpoint: bool = False) -> list[str]:
    """The speed passes a run applies: `names`, or by default every exact one (and `checkpoint` on
    request), less those that would change Hugging Face's dropout masks when `dropout_parity` is
    asked for, and those that leave the head to the built-in loss when the caller brings a loss."""
    chosen = list(SPEED_PASSES if names is None else names)
    if checkpoint and "checkpoint" not in chosen:
        chosen.append("checkpoint")
    return [name for name in chosen
            if not (dropout_parity and pass_class(name).changes_dropout)
            and not (custom_loss and pass_class(name).replaces_logits)]


def twin(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A train-mode copy of `gm` (same parameters, own metadata) rewritten by the passes `names`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # pytree's LeafSpec deprecation on copy
        graph = copy.deepcopy(gm.graph)
    meta = dict(info(gm), history=list(info(gm)["history"]))
    copied = wrap(gm, graph, meta, training=True)
    if names:
        with _quiet():
            copied = Pipeline(list(names)).run(copied)
    return copied


def graphs(gm: fx.GraphModule, names: Sequence[str], compile: bool = False) -> Graphs:
    """The training graphs for `gm`: the general twin, and the unpadded twin when `dense_attention`
    changes anything."""
    general = twin(gm, [n for n in names if not pass_class(n).unpadded_only])
    unpadded = None
    if any(pass_class(n).unpadded_only for n in names):
        candidate = twin(gm, names)
        if _changed(candidate, since=len(info(gm)["history"])):
            unpadded = candidate
    return Graphs(general, unpadded, compile)


def _changed(candidate: fx.GraphModule, since: int) -> bool:
    """Whether an unpadded-only pass changed the candidate graph (else the general graph serves all)."""
    return any(pass_class(entry["pass"]).unpadded_only and entry["modified"]
               for entry in info(candidate)["history"][since:])


class _quiet:
    """Speed passes are applied wherever they might help; one that finds nothing to do need not warn."""

    def __enter__(self):
        self.logger = logging.getLogger("rewrite.passes")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
