"""Fast dropout: the graph's dropouts draw their CPU masks from 16-bit random lanes (`rewrite.graph.dropout`).

Dropout is 38% of MiniLM's CPU training step (`benchmarks/dropout_cost.py`): torch draws each mask
element by element, and attention with dropout leaves SDPA's fused kernel for the math path. This
pass swaps every `aten.dropout` and every `scaled_dot_product_attention` with a train-mode dropout
probability for `rewrite.graph.dropout.dropout` / `attention`: the same distribution (each probability
rounded to a multiple of 2**-16), the same scaling, the same ops in eval mode and off the CPU. The
masks are not Hugging Face's, so `rewrite.training.train` leaves it out when a run asks for dropout parity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph import dropout
from rewrite.graph.modes import train_dropout_p
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register

aten = torch.ops.aten
log = logging.getLogger(__name__)
_STAND_INS = {aten.dropout.default: ("dropout", dropout.dropout),
              aten.scaled_dot_product_attention.default: ("attention", dropout.attention)}


@register
@dataclass
class FastDropoutPass(Pass):
    name = "fast_dropout"
    speed = SpeedPass(after=("rows",), changes_dropout=True)  # `rows` moves aten.dropout and SDPA nodes

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        swapped = {"dropout": 0, "attention": 0}
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target in _STAND_INS and train_dropout_p(node) > 0:
                kind, node.target = _STAND_INS[node.target]
                swapped[kind] += 1
        total = sum(swapped.values())
        if not total:
            log.warning("fast_dropout: the graph has no dropout with a train-mode probability; it is unchanged")
        self.report = {**swapped, "summary": f"{swapped['dropout']} dropouts and {swapped['attention']} attention "
                       "dropouts draw 16-bit masks" if total else "no dropout"}
        return PassResult(graph_module, bool(total))
