"""The project's IR: an unlifted `torch.fx.GraphModule` whose `train()`/`eval()` rewrite the graph.

`torch.export`'s unlifted module refuses `train()`; ours accepts it and rewrites the mode flags baked
into the graph (see `rewrite.modes`), so a captured graph trains like any `nn.Module`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

META_KEY = "rewrite"


class RewriteGraph(fx.GraphModule):
    """A captured graph. `gm.meta["rewrite"]` holds its provenance: config, tokenizer, task, pass history."""

    def train(self, mode: bool = True) -> "RewriteGraph":
        from rewrite.modes import set_graph_training

        nn.Module.train(self, mode)
        set_graph_training(self, mode)
        return self

    @property
    def info(self) -> dict[str, Any]:
        return self.meta.setdefault(META_KEY, {"history": []})


def wrap(root: nn.Module, graph: fx.Graph, info: dict[str, Any], training: bool) -> RewriteGraph:
    """Builds a RewriteGraph over `graph`, taking the attributes it reads from `root`."""
    gm = RewriteGraph(root, graph)
    gm.meta[META_KEY] = info
    info.setdefault("history", [])
    gm.train(training)
    return gm


def info(gm: fx.GraphModule) -> dict[str, Any]:
    """The rewrite metadata of any GraphModule (created empty if missing)."""
    return gm.meta.setdefault(META_KEY, {"history": []})


def add_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Registers `module` at dotted `path`, creating empty parents (register before the get_attr node)."""
    parent_path, _, name = path.rpartition(".")
    parent = gm
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(name, module)


def remove_submodule(gm: fx.GraphModule, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    delattr(parent, name)


def tensor_at(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a `get_attr` target names."""
    module_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    return getattr(owner, name)


def copy_meta(src: fx.Node, dst: fx.Node, **extra: Any) -> None:
    """New nodes carry no metadata: give them the module stack of the node they stand beside."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if extra:
        dst.meta.setdefault(META_KEY, {}).update(extra)


def tag(node: fx.Node) -> dict[str, Any]:
    """The rewrite tag a pass put on a node it created (empty for base nodes)."""
    return node.meta.get(META_KEY, {})
