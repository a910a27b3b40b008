"""Batches through a graph: the one loop that runs a graph over a data set without gradients (training's
evaluation, PET's predictions), and the one way a batch reaches the graph (its inputs, on its device),
which PET's auxiliary MLM loss uses too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
from torch import fx, nn

from rewrite.graph.ir import info
from rewrite.graph.modes import in_mode
from rewrite.graph.synthetic_inputs import DEFAULT_INPUT_NAMES

T = TypeVar("T")


def input_names(gm: fx.GraphModule) -> list[str]:
    """The graph's inputs, in order."""
    return list(info(gm).input_names or DEFAULT_INPUT_NAMES)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def graph_inputs(batch: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The entries of `batch` the graph takes (labels and masks of other uses stay out)."""
    return {name: batch[name] for name in names if name in batch}


def eval_mode(gm: nn.Module):
    """The graph in eval mode for the block, then back in the mode it was in."""
    return in_mode(gm, False)


def predict_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], names: Sequence[str],
                    device: torch.device, each: Callable[[dict[str, torch.Tensor], Any], T],
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> list[T]:
    """`each(batch, outputs)` for every batch (moved to `device`) run through `model`, without gradients."""
    results = []
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                outputs = model(**graph_inputs(batch, names))
            results.append(each(batch, outputs))
    return results
