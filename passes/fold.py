"""Fold: every pass merges what it added into the base graph's constants, so the deployed graph pays
nothing for training-time structure.

Each pass in the graph's history that can fold (`Foldable`) knows how: LoRA merges `W0 += scale * B @ A`
and erases its branches; P-tuning evaluates its prompt encoder once and keeps the constant table.
This pass asks every pass class in the history, in registration order (so the report reads the same
whatever order the passes ran in), and reports what each folded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph.pipeline import Folded, Pass, capable, register

log = logging.getLogger(__name__)


class Foldable(Protocol):
    """A pass that can merge what it added into the base graph's constants."""

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence[Pass]) -> Folded | None:
        """Merges what the runs added; None when there was nothing to fold."""


@register
@dataclass
class FoldPass(Pass):
    name = "fold"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        folded = [f for cls, runs in capable(graph_module, Foldable) if (f := cls.fold(graph_module, runs)) is not None]
        if not folded:
            log.warning("fold: nothing to fold (no pass in the graph's history left anything to fold, such as LoRA "
                        "branches or prompt encoders); the graph is unchanged")
        self.report = {f.key: f.items for f in folded}
        self.report["summary"] = f"folded {' and '.join(f.summary for f in folded)}" if folded else "nothing to fold"
        return PassResult(graph_module, bool(folded))
