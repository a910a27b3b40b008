"""Fold: every pass merges what it added into the base graph's constants, so the deployed graph pays
nothing for training-time structure.

Each pass in the graph's history knows how it folds (`Pass.fold`): LoRA merges `W0 += scale * B @ A`
and erases its branches; P-tuning evaluates its prompt encoder once and keeps the constant table.
This pass asks every pass class in the history, in registration order (so the report reads the same
whatever order the passes ran in), and reports what each folded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph.pipeline import Pass, applied, register

log = logging.getLogger(__name__)


@register
@dataclass
class FoldPass(Pass):
    name = "fold"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        folded = [f for cls, runs in applied(graph_module) if (f := cls.fold(graph_module, runs)) is not None]
        if not folded:
            log.warning("fold: nothing to fold (no pass in the graph's history left anything to fold, such as LoRA "
                        "branches or prompt encoders); the graph is unchanged")
        self.report = {f.key: f.items for f in folded}
        self.report["summary"] = f"folded {' and '.join(f.summary for f in folded)}" if folded else "nothing to fold"
        return PassResult(graph_module, bool(folded))
