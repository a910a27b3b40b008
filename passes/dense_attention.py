"""Dense attention: the graph for batches without padding, with no materialized attention mask.

Hugging Face builds a `[batch, 1, seq, seq]` boolean mask from `attention_mask` and hands it to
`scaled_dot_product_attention`. When no position is padding that mask is all true (an encoder) or
the causal triangle (a decoder), which SDPA computes itself: `attn_mask=None`, with `is_causal`
for the triangle, so the mask is never built and the causal kernel skips the upper half. Which of
the two a mask is, is not guessed from names: the pass runs the mask's own subgraph on unpadded
inputs of two shapes and compares; a mask that is neither (sliding windows, custom masks) stays.

The rewritten graph ignores `attention_mask`, so it is exact only for batches without padding;
`rewrite.training.train` (`rewrite.training.speed`) sends padded batches to the general graph.
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
_MASK, _CAUSAL = 3, 5
_SHAPES = ((2, 3), (3, 7))  # (batch, seq) of the probes


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _mask_program(gm: fx.GraphModule, mask: fx.Node) -> fx.GraphModule | None:
    """The mask's subgraph as a module of the graph inputs it reads; None when it reads parameters
    or activations (then it is not a function of the inputs' shapes and padding alone)."""
    nodes = _ancestors(mask)
    if any(n.op not in ("placeholder", "call_function") for n in nodes):
        return None
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        copies[node] = graph.node_copy(node, lambda n: copies[n])
    graph.output(copies[mask])
    return fx.GraphModule(gm, graph)


def _unpadded(program: fx.GraphModule, batch: int, seq: int) -> dict[str, torch.Tensor] | None:
    inputs = {}
    for node in program.graph.find_nodes(op="placeholder"):
        if node.target == "attention_mask":
            inputs[node.target] = torch.ones(batch, seq, dtype=torch.long)
        elif node.target in ("input_ids", "token_type_ids"):
            inputs[node.target] = torch.zeros(batch, seq, dtype=torch.long)
        else:
            return None
    return inputs


def mask_kind(gm: fx.GraphModule, mask: fx.Node) -> str | None:
    """"full" or "causal" when the mask, for every unpadded batch probed, allows all positions or
    exactly the causal triangle; else None."""
    program = _mask_program(gm, mask)
    if program is None:
        return None
    kinds = set()
    for batch, seq in _SHAPES:
        inputs = _unpadded(program, batch, seq)
        if inputs is None:
            return None
        with torch.no_grad():
            value = program(**inputs)
        allowed = value if value.dtype == torch.bool else value == 0
        if allowed.dim() != 4 or tuple(allowed.shape[-2:]) != (seq, seq):
            return None
        triangle = torch.ones(seq, seq, dtype=torch.bool).tril()
        kinds.add("full" if bool(allowed.all()) else "causal" if bool((allowed == triangle).all()) else None)
    return kinds.pop() if len(kinds) == 1 else None


def _drop_mask(node: fx.Node, causal: bool) -> None:
    """`sdpa(q, k, v, mask, p, False, ...)` -> `sdpa(q, k, v, None, p, causal, ...)`."""
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    node.args = (*node.args[:3], None, dropout, causal)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")}


def _drop_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        if node.op == "call_function" and not node.users:
            graph.erase_node(node)


@register
@dataclass
class DenseAttentionPass(Pass):
    name = "dense_attention"
    speed = SpeedPass(unpadded_only=True)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        kinds: dict[fx.Node, str | None] = {}
        rewritten = []
        for node in list(gm.graph.find_nodes(op="call_function", target=_SDPA)):
            mask = node.args[_MASK] if len(node.args) > _MASK else node.kwargs.get("attn_mask")
            if not isinstance(mask, fx.Node) or node.kwargs.get("is_causal") or \
                    (len(node.args) > _CAUSAL and node.args[_CAUSAL]):
                continue
            if mask not in kinds:
                kinds[mask] = mask_kind(gm, mask)
            if kinds[mask] is None:
                continue
            _drop_mask(node, causal=kinds[mask] == "causal")
            rewritten.append(kinds[mask])
        for mask in kinds:
            if not mask.users:
                _drop_dead(gm.graph, _ancestors(mask))
        self.report = {"attention": len(rewritten), "kinds": sorted(set(rewritten)),
                       "summary": f"{len(rewritten)} attention calls without a mask ({', '.join(sorted(set(rewritten)))})"
                       if rewritten else "no attention mask to drop"}
        return PassResult(gm, bool(rewritten))
