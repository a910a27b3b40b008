"""Grouped attention: grouped-query attention reads its key/value heads as they are, not repeated.

A model with fewer key/value heads than query heads (LLaMA-2 70B, Mistral, Qwen2, the benchmark's
LLaMA) repeats each key/value head for its group of query heads before `scaled_dot_product_attention`
(`repeat_kv`: unsqueeze, expand, reshape: a copy). Autograd then saves the repeated copies for the
attention's backward. SDPA does the grouping itself with `enable_gqa=True`: the copies are never
made or saved (a third of the key/value memory with 4 groups, and the same numbers).

Only attention without a materialized mask is rewritten (the graph `dense_attention` makes for
batches without padding): that is where every backend runs grouped attention in its fused kernels;
with a mask some fall back to the math kernel, which would cost more than the copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_GROUP_DIM = 2  # repeat_kv: [batch, kv_heads, seq, dim] -> unsqueeze(2) -> expand the group -> reshape


def _repeated(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(the key/value heads, the group size) when `node` is `repeat_kv`'s reshape(expand(unsqueeze(t, 2)))."""
    if node.target is not aten.reshape.default:
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default and len(expand.users) == 1):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target is aten.unsqueeze.default
            and unsqueeze.args[1] == _GROUP_DIM and len(unsqueeze.users) == 1):
        return None
    sizes = expand.args[1]
    group = sizes[_GROUP_DIM] if len(sizes) == 5 else None
    return (unsqueeze.args[0], group) if isinstance(group, int) and group > 1 else None


def _maskless(node: fx.Node) -> bool:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return mask is None and not node.kwargs.get("enable_gqa", False)


def _group(node: fx.Node) -> bool:
    """Rewrites one attention call when both its key and value are repeated alike; says whether it did."""
    key, value = (_repeated(operand) for operand in node.args[1:3])
    if key is None or value is None or key[1] != value[1]:
        return False
    repeats = node.args[1:3]
    node.args = (node.args[0], key[0], value[0], *node.args[3:])
    node.kwargs = {**node.kwargs, "enable_gqa": True}
    for reshape in repeats:
        if not reshape.users:
            expand = reshape.args[0]
            unsqueeze = expand.args[0]
            for dead in (reshape, expand, unsqueeze):
                node.graph.erase_node(dead)
    return True


@register
@dataclass
class GroupedAttentionPass(Pass):
    name = "grouped_attention"
    speed = SpeedPass(needs=("dense_attention",))  # it rewrites the attention dense_attention leaves without a mask

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        calls = [n for n in graph_module.graph.find_nodes(op="call_function", target=_SDPA) if _maskless(n)]
        grouped = sum(_group(node) for node in calls)
        self.report = {"grouped": grouped,
                       "summary": f"{grouped} attention calls read the key/value heads without repeating them"
                       if grouped else "no repeated key/value heads before attention without a mask"}
        return PassResult(graph_module, bool(grouped))
