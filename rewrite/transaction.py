"""All or nothing: a pipeline or adapter load that fails part-way leaves the graph as it was.

A pass changes the graph, registers modules and parameters, flips `requires_grad` and records
metadata; the snapshot keeps each of those (containers, not tensor data: passes add tensors rather
than write into the base's) and puts them back if the block raises.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Iterator

from torch import fx

from rewrite.ir import META_KEY, info


def _shallow(value):
    return copy.copy(value) if isinstance(value, (list, dict, set)) else value


@contextlib.contextmanager
def all_or_nothing(gm: fx.GraphModule) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # pytree's LeafSpec deprecation on copy
        graph = copy.deepcopy(gm.graph)
    modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers))
               for _, m in gm.named_modules(remove_duplicate=False)]
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    saved = info(gm)
    meta = copy.copy(saved)
    for item in dataclasses.fields(meta):
        setattr(meta, item.name, _shallow(getattr(saved, item.name)))
    training = gm.training
    try:
        yield
    except BaseException:
        for module, children, parameters, buffers in modules:
            module._modules, module._parameters, module._buffers = children, parameters, buffers
        for param, flag in flags:
            param.requires_grad_(flag)
        gm.meta[META_KEY] = meta
        gm.graph = graph
        gm.training = training
        raise
