"""Fused LoRA: the A projections of LoRA branches that read the same tensor become one matmul.

q, k and v (and an MLP's gate and up) read the same normalized hidden states; their branches'
`x @ A_i.T` become one `x @ cat(A_1, ..., A_n).T` whose columns are sliced back out, one slice
per branch's B. The concatenation is of the parameters themselves, inside the graph, so each A
keeps its own gradient and its adapter file entry. A branch with its own dropout on the input reads
its own tensor and is left alone (sharing one dropout mask would change the numbers), as is a
fused base projection (GPT-2's `c_attn`): it has one branch already.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters.branches import is_down, mark_down
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register
from rewrite.graph.nodes import NodeBuilder

aten = torch.ops.aten


def _a_projections(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Low-rank down projections (`linear(x, A)`) by the node they read, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
        if is_down(node) and node.args[1].op == "get_attr":
            groups.setdefault(node.args[0], []).append(node)
    return groups


def _fuse(gm: fx.GraphModule, projections: list[fx.Node]) -> None:
    build = NodeBuilder(gm.graph, projections[0], before=projections[0], **{"pass": "fused_lora"})
    weights = [p.args[1] for p in projections]
    fused = build(aten.cat.default, [build.attr(w.target) for w in weights], 0)
    h = build(aten.linear.default, projections[0].args[0], fused)
    mark_down(h)
    start = 0
    for projection in projections:
        rank = gm.get_parameter(projection.args[1].target).shape[0]
        projection.replace_all_uses_with(build(aten.slice.Tensor, h, -1, start, start + rank))
        start += rank
    for node in projections + weights:
        if not node.users:
            gm.graph.erase_node(node)


@register
@dataclass
class FusedLoraPass(Pass):
    name = "fused_lora"
    speed = SpeedPass(after=("rows", "gated_activation"))

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        groups = [g for g in _a_projections(graph_module).values() if len(g) > 1]
        for group in groups:
            _fuse(graph_module, group)
        fused = sum(len(g) for g in groups)
        self.report = {"fused": fused, "matmuls": len(groups),
                       "summary": f"{fused} LoRA A projections now run as {len(groups)} matmuls" if groups
                       else "no LoRA branches share an input"}
        return PassResult(graph_module, bool(groups))
