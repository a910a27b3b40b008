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

from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph.query import layer_index, module_path
from rewrite.graph.outline import outline
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register


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


@register
@dataclass
class CheckpointPass(Pass):
    name = "checkpoint"
    speed = SpeedPass(default=False, last=True)  # it outlines whole blocks as the others left them

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        blocks = _blocks(gm.graph)
        for layer, nodes in blocks.items():
            outline(gm, nodes, f"checkpointed_block_{layer}")
        self.report = {"blocks": sorted(blocks),
                       "summary": f"{len(blocks)} blocks run under activation checkpointing" if blocks
                       else "no contiguous numbered blocks"}
        return PassResult(gm, bool(blocks))
