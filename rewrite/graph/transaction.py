"""All or nothing: a pipeline or adapter load that fails part-way leaves the graph as it was.

A pass changes the graph, registers modules and parameters, flips `requires_grad` and records
metadata; the snapshot keeps each of those (containers, not tensor data) and puts them back if the
block raises. A pass that writes into an existing tensor (fold merges into `W0`) does it through
`overwrite`, which journals the old data so that a later failure puts it back too.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Iterator

import torch
from torch import fx

from rewrite.graph.ir import META_KEY, deep_copy, info

_JOURNALS: list[list[tuple[torch.Tensor, torch.Tensor]]] = []


def overwrite(tensor: torch.Tensor, value: torch.Tensor | float) -> None:
    """Writes `value` into `tensor` in place, journalled for the transaction around it (if any)."""
    with torch.no_grad():
        if _JOURNALS:
            _JOURNALS[-1].append((tensor, tensor.detach().clone()))
        tensor.copy_(torch.as_tensor(value, dtype=tensor.dtype).expand_as(tensor))


def _shallow(value):
    return copy.copy(value) if isinstance(value, (list, dict, set)) else value


@contextlib.contextmanager
def all_or_nothing(gm: fx.GraphModule) -> Iterator[None]:
    graph = deep_copy(gm.graph)
    modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers))
               for _, m in gm.named_modules(remove_duplicate=False)]
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    saved = info(gm)
    meta = copy.copy(saved)
    for item in dataclasses.fields(meta):
        setattr(meta, item.name, _shallow(getattr(saved, item.name)))
    training = gm.training
    journal: list[tuple[torch.Tensor, torch.Tensor]] = []
    _JOURNALS.append(journal)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for tensor, old in reversed(journal):
                tensor.copy_(old)
        for module, children, parameters, buffers in modules:
            module._modules, module._parameters, module._buffers = children, parameters, buffers
        for param, flag in flags:
            param.requires_grad_(flag)
        gm.meta[META_KEY] = meta
        gm.graph = graph
        gm.training = training
        raise
    finally:
        _JOURNALS.pop()
    if _JOURNALS:
        _JOURNALS[-1].extend(journal)  # an enclosing transaction may still fail
