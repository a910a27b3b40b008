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

from rewrite.graph.blocks import find_blocks
from rewrite.graph.outline import outline
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register


def _blocks(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Each block's stretch of the graph (`rewrite.graph.blocks`), with the get_attrs only it reads. A block
    another block's nodes interleave with is left out."""
    nodes = list(graph.nodes)
    blocks = {}
    for block in find_blocks(graph):
        if block.interleaved:
            continue
        inside = set(block.stretch)
        attrs = {a for n in block.stretch for a in n.all_input_nodes
                 if a.op == "get_attr" and set(a.users) <= inside}
        blocks[block.path] = [n for n in nodes if n in attrs] + block.stretch
    return blocks


@register
@dataclass
class CheckpointPass(Pass):
    name = "checkpoint"
    speed = SpeedPass(default=False, last=True, outlines=True)  # it outlines whole blocks as the others left them

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        blocks = _blocks(gm.graph)
        for number, nodes in enumerate(blocks.values()):
            outline(gm, nodes, f"checkpointed_block_{number}")
        self.report = {"blocks": sorted(int(path.rpartition(".")[2]) for path in blocks),
                       "summary": f"{len(blocks)} blocks run under activation checkpointing" if blocks
                       else "no contiguous numbered blocks"}
        return PassResult(gm, bool(blocks))
