"""Chunked loss: a language model's graph stops at the hidden states; the loss applies the head.

The graph's `logits` output becomes the hidden states the output head reads, and the head (weight,
bias, layout) is recorded in the graph's metadata, so `rewrite.training.train` computes head and
cross-entropy together on the labelled positions only, chunk by chunk (`rewrite.training.losses`): the
`[batch, seq, vocab]` logits never exist. The loss and every gradient are those of the plain loss.

A training-graph pass: the rewritten graph's `logits` output holds hidden states. `rewrite.training.train`
applies it to its own training copy of the graph (`rewrite.training.speed`); the user's graph, its
evaluation, fold and export keep the logits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph.query import GraphQuery
from rewrite.graph.ir import LossHead, info
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register

log = logging.getLogger(__name__)
LM_TASKS = ("causal-lm", "masked-lm")


def _logits_node(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's first (logits) output, when the graph returns it directly."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    flat = output.args[0]
    first = flat[0] if isinstance(flat, (list, tuple)) and flat else None
    return first if isinstance(first, fx.Node) else None


@register
@dataclass
class ChunkedLossPass(Pass):
    name = "chunked_loss"
    speed = SpeedPass(replaces_logits=True)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        logits = _logits_node(gm)
        head = next((p for p in GraphQuery(gm).output_heads if p.node is logits), None)
        cut = (info(gm).task in LM_TASKS and info(gm).loss_head is None and head is not None
               and logits.target is torch.ops.aten.linear.default and len(logits.users) == 1)
        if cut:
            bias = logits.args[2] if len(logits.args) > 2 else None
            info(gm).loss_head = LossHead(head.weight, bias.target if bias is not None else None, head.transposed,
                                          head.path)
            logits.replace_all_uses_with(head.input)
            gm.graph.erase_node(logits)
        self.report = {"head": head.path if cut else None,
                       "summary": f"the loss applies {head.path}" if cut else "no language-model head to cut"}
        return PassResult(gm, cut)
