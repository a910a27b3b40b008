"""Outlining: a set of graph nodes becomes a sub-graph the main graph calls.

Activation checkpointing (per block, or a norm recomputed for the LoRA branches that read it) is
`outline`: the nodes move into a `GraphModule` of their own that the graph calls through
`run_checkpointed`, so autograd keeps only the sub-graph's inputs and recomputes the rest in the
backward (the RNG state restored, so dropout draws the same masks).

Sharding per transformer block is `outline_module`: the nodes move into a `GraphModule` that takes
the place of the module they came from, holding its tensors under their own names, so FSDP's hooks
fire when the graph calls that module and each tensor keeps one owner.
"""
from __future__ import annotations

import operator

import torch.utils.checkpoint
from torch import fx

from rewrite.graph.ir import copy_meta


def run_checkpointed(block: fx.GraphModule, *inputs):
    """A sub-graph's outputs, its activations recomputed in the backward (RNG state preserved)."""
    return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)


def outline(gm: fx.GraphModule, nodes: list[fx.Node], name: str, before: fx.Node | None = None) -> None:
    """Moves `nodes` (in graph order) into the sub-module `name`, called through `run_checkpointed`
    before `before` (default: where the last of them was). The caller makes sure that the nodes'
    inputs come before that point and every other user of their results after it."""
    sub, inputs, outputs = _extract(nodes)
    gm.add_submodule(name, fx.GraphModule(gm, sub))
    with gm.graph.inserting_before(before if before is not None else nodes[-1].next):
        block = gm.graph.get_attr(name)
        call = gm.graph.call_function(run_checkpointed, (block, *inputs))
    _splice(gm, nodes, outputs, call, (block,))


def outline_module(gm: fx.GraphModule, path: str, nodes: list[fx.Node], checkpointed: bool = False) -> None:
    """Moves `nodes` (in graph order; their get_attrs read tensors under `path`) into a GraphModule that
    replaces the module at `path` and holds its submodules, parameters and buffers (the same objects, in
    the same order), called where the last node was (through `run_checkpointed` when `checkpointed`: the
    module's own call, so its hooks still fire, and again in the backward). Parameter names and owners
    stay as they were."""
    container = gm.get_submodule(path)
    sub, inputs, outputs = _extract(nodes, prefix=path + ".")
    block = fx.GraphModule(container, sub, class_name="Block")
    for slot in ("_modules", "_parameters", "_buffers"):  # the originals, not the copies GraphModule made
        setattr(block, slot, dict(getattr(container, slot)))
    block._non_persistent_buffers_set = set(container._non_persistent_buffers_set)
    block.train(container.training)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, block)
    with gm.graph.inserting_before(nodes[-1].next):
        made = (gm.graph.get_attr(path),) if checkpointed else ()
        call = (gm.graph.call_function(run_checkpointed, (*made, *inputs)) if checkpointed
                else gm.graph.call_module(path, tuple(inputs)))
    _splice(gm, nodes, outputs, call, made)


def _extract(nodes: list[fx.Node], prefix: str = "") -> tuple[fx.Graph, list[fx.Node], list[fx.Node]]:
    """`nodes` copied into a graph of their own (get_attr targets without `prefix`), the outside nodes
    they read (its placeholders, in order) and the ones read outside (its output tuple)."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for node in nodes:
        env[node] = sub.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":
            env[node].target = node.target.removeprefix(prefix)
    sub.output(tuple(env[n] for n in outputs))
    return sub, inputs, outputs


def _splice(gm: fx.GraphModule, nodes: list[fx.Node], outputs: list[fx.Node], call: fx.Node,
            made: tuple[fx.Node, ...]) -> None:
    """Reads `outputs` from `call`'s result tuple instead, and erases `nodes`. The new nodes carry the
    module stack of the last moved node, so graph queries still place them."""
    inside = set(nodes)
    with gm.graph.inserting_before(call.next):
        results = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for new in (*made, call, *results):
        copy_meta(nodes[-1], new)
    for old, new in zip(outputs, results):
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
