"""Outlining: a set of graph nodes becomes a sub-graph the main graph calls through a runner.

Activation checkpointing (per block, or a norm recomputed for the LoRA branches that read it) is
this: the nodes move into a `GraphModule` of their own that the graph calls through
`run_checkpointed`, so autograd keeps only the sub-graph's inputs and recomputes the rest in the
backward (the RNG state restored, so dropout draws the same masks).
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
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for node in nodes:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in outputs))
    gm.add_submodule(name, fx.GraphModule(gm, sub))
    with gm.graph.inserting_before(before if before is not None else nodes[-1].next):
        block = gm.graph.get_attr(name)
        call = gm.graph.call_function(run_checkpointed, (block, *inputs))
        results = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for new in (block, call, *results):
        copy_meta(nodes[-1], new)  # the module the nodes came from, so graph queries still place them
    for old, new in zip(outputs, results):
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
