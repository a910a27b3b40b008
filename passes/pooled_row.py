"""The `rows` pass (pooled row): a graph that reads its hidden states at one position computes that position alone.

BERT-style sequence classifiers pool `hidden[:, 0]` (`[CLS]`); everything after the last block's
attention, and the last block's query and attention for that one row, only matters for that row.
This pass moves the read up through those nodes (`rewrite.graph.row_gather`), so the last block runs on one row
per example, with the same outputs in eval mode. `rewrite.training.train` applies it to its training graph
by default (`rewrite.training.speed`), unless the run asks for Hugging Face's dropout masks bit for bit.

It is a pass, not part of capture, because in train mode the moved dropouts draw fewer random
numbers, so a seeded run no longer reproduces Hugging Face's dropout masks bit for bit (the
distribution is the same). The verbalizer pass does the same for the `[MASK]` read on its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register
from rewrite.graph.row_gather import select_rows

log = logging.getLogger(__name__)


@register
@dataclass
class PooledRowPass(Pass):
    name = "rows"
    speed = SpeedPass(after=("chunked_loss", "grouped_attention"), changes_dropout=True)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        moved = select_rows(graph_module)
        if not moved:
            log.warning("rows: the graph reads no hidden states at a single position (such as a [CLS] pooler); "
                        "it is unchanged")
        self.report = {
            "moved": moved,
            "summary": f"{moved} nodes before a one-position read now compute that row alone" if moved
            else "nothing to move",
        }
        return PassResult(graph_module, bool(moved))
