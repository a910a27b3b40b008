"""Recompute input: a LoRA branch whose input is a norm or an activation recomputes it in the backward.

The A projection of a LoRA branch saves its input for A's gradient. When that input is a norm's output
(q/k/v read the attention norm, gate/up the MLP norm, GPT-2's `c_attn` reads `ln_1`) or an
activation's (BERT's `output.dense` reads a GELU), the norm or activation has already saved its own
input, so autograd keeps two tensors where one would do. This pass outlines the cheap nodes that
make the branch input from that one tensor (an RMSNorm's pow/mean/rsqrt/mul chain, a `layer_norm`,
a GELU; views and casts) together with the A projections that read it into a checkpointed sub-graph
(`rewrite.graph.outline`): only the one tensor is kept, and the cheap nodes and the rank-r projections
run again in the backward, with the same kernels, so the numbers are the plain graph's. The frozen
projections that read the same tensor save nothing of it (their weights need no gradient), so they
read the sub-graph's output as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters.branches import is_down
from rewrite.graph.outline import outline
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register

aten = torch.ops.aten
_ASSERT = aten._assert_tensor_metadata.default
# ops whose backward needs their input: a region with one of them reads a tensor autograd keeps anyway
_SAVING = {aten.mean.dim, aten.layer_norm.default, aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.mul.Tensor,
           aten.div.Tensor, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sqrt.default}
_CHEAP = _SAVING | {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.to.dtype, aten._to_copy.default,
                    aten.view.default, aten.reshape.default, aten._unsafe_view.default, _ASSERT}


def _a_projections(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Low-rank down projections (LoRA's A, or several fused by `fused_lora`) by the tensor they read."""
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.find_nodes(op="call_function", target=aten.linear.default):
        if is_down(node):
            found.setdefault(node.args[0], []).append(node)
    return found


def _checks(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is _ASSERT and not u.users]


def _grow(output: fx.Node) -> set[fx.Node]:
    """`output` and the cheap nodes before it whose every result only these nodes read."""
    region = {output, *_checks(output)}
    grown = True
    while grown:
        grown = False
        for node in list(region):
            for source in node.all_input_nodes:
                if (source not in region and source.op == "call_function" and source.target in _CHEAP
                        and all(u in region or u in _checks(source) for u in source.users)):
                    region |= {source, *_checks(source)}
                    grown = True
    return region


def _activations(region: set[fx.Node]) -> list[fx.Node]:
    """The region's inputs that are not parameters or sizes."""
    return list({a for n in region for a in n.all_input_nodes
                 if a not in region and a.op != "get_attr" and a.target is not aten.sym_size.int})


def _recipe(output: fx.Node) -> list[fx.Node] | None:
    """The cheap nodes that make `output` from one activation, in graph order; None when there are none
    that save it. A region reading more (a residual sum before a LayerNorm) loses its earliest nodes
    until it reads one."""
    if output.op != "call_function" or output.target not in _CHEAP:
        return None
    order = {n: i for i, n in enumerate(output.graph.nodes)}
    region = _grow(output)
    while len(_activations(region)) > 1 and len(region) > 1:
        earliest = min((n for n in region if n is not output and n.target is not _ASSERT), key=order.get)
        region -= {earliest, *_checks(earliest)}
    if len(_activations(region)) != 1 or not any(n.target in _SAVING for n in region):
        return None
    return sorted(region, key=order.get)


def _outline_recipe(gm: fx.GraphModule, recipe: list[fx.Node], projections: list[fx.Node], name: str) -> bool:
    """Outlines the recipe and its A projections before the first other reader of their results."""
    first = recipe[0]
    for weight in dict.fromkeys(p.args[1] for p in projections):  # the A weights move up to the norm
        for part in (weight.args[0] if weight.op == "call_function" else []):
            first.prepend(part)
        first.prepend(weight)
    nodes = recipe + projections
    inside = set(nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    readers = [u for n in nodes for u in n.users if u not in inside]
    if not readers:
        return False
    before = min(readers, key=order.get)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    if any(order[a] >= order[before] for a in inputs):
        return False
    outline(gm, sorted(nodes, key=order.get), name, before=before)
    return True


@register
@dataclass
class RecomputeInputPass(Pass):
    name = "recompute_input"
    speed = SpeedPass(after=("fused_lora",), outlines=True)  # it recomputes fused A projections too

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        done = 0
        for output, projections in _a_projections(gm.graph).items():
            recipe = _recipe(output)
            if recipe is not None and _outline_recipe(gm, recipe, projections, f"recomputed_input_{done}"):
                done += 1
        self.report = {"recomputed": done,
                       "summary": f"{done} LoRA branch inputs recomputed in the backward" if done
                       else "no LoRA branch reads a norm or an activation"}
        return PassResult(gm, bool(done))
