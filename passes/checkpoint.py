"""Checkpoint: each transformer block runs under activation checkpointing.

The nodes of block i (module paths numbered like `model.layers.i.`, and what passes added there)
become a sub-graph the main graph calls through `torch.utils.checkpoint.checkpoint`: the block
keeps only its inputs for the backward and recomputes the rest, so activation memory grows with
the number of blocks times one block's inputs instead of everything every block computes. The RNG
state is restored for the recomputation, so dropout draws the same masks: the numbers are those of
the plain graph. It costs one more forward per block; worth it for long sequences, so opt-in
(`rewrite train --speed-passes ...,checkpoint`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.utils.checkpoint
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph import layer_index, module_path
from rewrite.pipeline import Pass, register


def run_checkpointed(block: fx.GraphModule, *inputs):
    """A block's outputs, its activations recomputed in the backward (RNG state preserved)."""
    return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)


def _layer(node: fx.Node) -> int | None:
    if node.op != "call_function":
        return None
    return layer_index((module_path(node) or "") + ".")  # the block module's own nodes too (its residuals)


def _blocks(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """Each block's nodes: the stretch of the graph from its first to its last node, with the unnumbered
    calls in between (shape arithmetic, a pass's helpers) and the get_attrs only they read. A block
    another block's nodes interleave with is left out."""
    nodes = list(graph.nodes)
    spans: dict[int, list[int]] = {}
    for position, node in enumerate(nodes):
        layer = _layer(node)
        if layer is not None:
            spans.setdefault(layer, [position, position])[1] = position
    blocks = {}
    for layer, (first, last) in spans.items():
        stretch = [n for n in nodes[first:last + 1] if n.op == "call_function"]
        if any(_layer(n) not in (None, layer) for n in stretch):
            continue
        inside = set(stretch)
        attrs = {a for n in stretch for a in n.all_input_nodes if a.op == "get_attr" and set(a.users) <= inside}
        blocks[layer] = [n for n in nodes if n in attrs] + stretch
    return blocks


def _outline(gm: fx.GraphModule, layer: int, nodes: list[fx.Node]) -> None:
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for node in nodes:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in outputs))
    name = f"checkpointed_block_{layer}"
    gm.add_submodule(name, fx.GraphModule(gm, sub))
    with gm.graph.inserting_before(nodes[-1].next):
        block = gm.graph.get_attr(name)
        call = gm.graph.call_function(run_checkpointed, (block, *inputs))
        results = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for old, new in zip(outputs, results):
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


@register
@dataclass
class CheckpointPass(Pass):
    name = "checkpoint"
    speed_rank = 50
    speed_default = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        blocks = _blocks(gm.graph)
        for layer, nodes in blocks.items():
            _outline(gm, layer, nodes)
        self.report = {"blocks": sorted(blocks),
                       "summary": f"{len(blocks)} blocks run under activation checkpointing" if blocks
                       else "no contiguous numbered blocks"}
        return PassResult(gm, bool(blocks))
