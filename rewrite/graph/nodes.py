"""Building graph nodes: the one builder every pass uses.

New nodes carry no metadata of their own. A builder gives each node the module stack of the node it
stands beside (so graph queries still see which module it belongs to) and the pass's rewrite tag
(so later passes and hooks can find what a pass made), and remembers what it made.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from rewrite.graph.ir import copy_meta

aten = torch.ops.aten


class NodeBuilder:
    """Creates nodes that look like `like` (its module metadata) and carry `tag`.

    With `before`, every node goes right before that node; without, at the graph's insertion point
    (inside the caller's `graph.inserting_before(...)`).
    """

    def __init__(self, graph: fx.Graph, like: fx.Node, *, before: fx.Node | None = None, **tag: Any):
        self.graph, self.like, self.before, self.tag = graph, like, before, tag
        self.created: set[fx.Node] = set()

    def at(self, node: fx.Node) -> "NodeBuilder":
        """From now on, nodes go before `node` and take its metadata."""
        self.like = self.before = node
        return self

    def _place(self):
        return self.graph.inserting_before(self.before) if self.before is not None else contextlib.nullcontext()

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self._place():
            return self.keep(self.graph.call_function(target, args, kwargs))

    def attr(self, target: str) -> fx.Node:
        """A `get_attr` node (register the tensor first)."""
        with self._place():
            return self.keep(self.graph.get_attr(target))

    def keep(self, node: fx.Node, **extra: Any) -> fx.Node:
        """Tags a node made elsewhere (e.g. copied from another graph) as this builder's."""
        copy_meta(self.like, node, **self.tag, **extra)
        self.created.add(node)
        return node

    def copy(self, node: fx.Node, remap: dict[fx.Node, fx.Node]) -> fx.Node:
        """The model's own node on other inputs. It stays untagged and keeps its module, so graph queries
        still find it for what it is (a projection, the output head)."""
        with self._place():
            return self.graph.node_copy(node, lambda n: remap.get(n, n))

    def to_dtype(self, node: fx.Node, source: torch.dtype, target: torch.dtype) -> fx.Node:
        """`node` cast from `source` to `target` (itself when they agree): tensors a pass keeps in fp32
        meet a half-precision model here."""
        return node if source == target else self(aten._to_copy.default, node, dtype=target)

    def redirect(self, old: fx.Node, new: fx.Node, keep: tuple[fx.Node, ...] = ()) -> None:
        """Every use of `old`, except by the nodes made here and by `keep`, now reads `new`."""
        spared = self.created | set(keep)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in spared)


def set_output(gm: fx.GraphModule, output_type: type, **leaves: fx.Node) -> None:
    """The graph returns `output_type(**leaves)` (a `ModelOutput`; ONNX names its outputs after the keys)."""
    output = gm.graph.output_node()
    output.args = (tuple(leaves.values()),)
    example = output_type(**{key: torch.empty(0) for key in leaves})
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=pytree.tree_flatten(example)[1])


def drop_outputs(gm: fx.GraphModule, *names: str) -> None:
    """The graph stops returning the outputs `names` (of its `ModelOutput`), and stops computing what only
    they needed."""
    spec = gm.graph._codegen.pytree_info.out_spec
    leaves = dict(zip(spec.context, gm.graph.output_node().args[0]))
    if not set(names) & set(leaves):
        return
    set_output(gm, spec.type, **{key: leaf for key, leaf in leaves.items() if key not in names})
    gm.graph.eliminate_dead_code()
    gm.recompile()


def drop_dtype_checks(graph: fx.Graph, dtype: torch.dtype) -> None:
    """Removes the capture's checks that tensors are `dtype` (torch.export records one per cast): for a graph
    that is about to run in another precision. The caller recompiles."""
    for node in graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default):
        if node.kwargs.get("dtype") == dtype:
            graph.erase_node(node)
