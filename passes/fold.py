"""Fold: every pass merges what it added into the base graph's constants, so the deployed graph pays
nothing for training-time structure.

Each pass in the graph's history that can fold (`Foldable`) knows how: LoRA merges `W0 += scale * B @ A`
and erases its branches; P-tuning evaluates its prompt encoder once and keeps the constant table.
This pass asks every pass class in the history, in registration order (so the report reads the same
whatever order the passes ran in), and reports what each folded.

Merging into quantized weights is lossy, so the branches engine refuses it unless `requantize`: the adapted
quantized projections are made float (`dequant(Wq)`), folded, and quantized again with their own bits, block size
and zero points; the report gives the largest weight error and the output difference against the unfolded graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from rewrite.adapters import branches
from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.ir import info, remove_tensor
from rewrite.graph.pipeline import Folded, Pass, capable, option, register
from rewrite.graph.query import GraphQuery, later_first, module_path
from rewrite.graph.signature import vocab_size
from rewrite.graph.synthetic_inputs import DEFAULT_INPUT_NAMES, example_inputs

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

    requantize: bool = option(False, "merge into quantized weights and quantize them again (lossy: reports the "
                                     "weight error and the output difference)")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        plan = _dequantize_adapted(graph_module) if self.requantize else {}
        unfolded = _outputs(graph_module) if plan else None
        folded = [f for cls, runs in capable(graph_module, Foldable) if (f := cls.fold(graph_module, runs)) is not None]
        if not folded:
            log.warning("fold: nothing to fold (no pass in the graph's history left anything to fold, such as LoRA "
                        "branches or prompt encoders); the graph is unchanged")
        self.report = {f.key: f.items for f in folded}
        self.report["summary"] = f"folded {' and '.join(f.summary for f in folded)}" if folded else "nothing to fold"
        if plan:
            error = _quantize_again(graph_module, plan)
            difference = max((a - b).abs().max().item() for a, b in zip(unfolded, _outputs(graph_module)))
            self.report["requantized"] = {"modules": sorted(plan), "weight_error": error, "output_difference": difference}
            self.report["summary"] += (f", requantized {len(plan)} modules: weights within {error:.3g} of the merged "
                                       f"float weights, outputs within {difference:.3g} of the unfolded graph")
        return PassResult(graph_module, bool(folded))


def _dequantize_adapted(gm: fx.GraphModule) -> dict[str, quantized.Format]:
    """Makes every quantized projection that carries a branch float, and points its branches at that weight;
    returns each one's module and format."""
    adapted = {site.path for site in branches.sites(gm)}
    plan = {}
    nodes = [n for n in gm.graph.nodes if quantized.is_quantized(n)]
    tied = next((module_path(n) for n in nodes if module_path(n) in adapted and quantized.reads_a_table(gm, n)), None)
    if tied is not None:
        raise RewriteError(f"fold cannot requantize {tied}: its packed weights are the quantized embeddings' table "
                           "too, so merging its adapter would change the embeddings; keep the adapter unfolded "
                           "(adapter slots), or quantize the head without the embeddings")
    for node in nodes:
        owner = node.args[1].target.rpartition(".")[0]
        if owner in adapted:
            plan[owner] = quantized.format_of(node)
            branches.retarget(gm, owner, quantized.unpack(gm, node))
    gm.recompile()
    return plan


def _quantize_again(gm: fx.GraphModule, plan: dict[str, quantized.Format]) -> float:
    """Quantizes the folded float weights as they were; returns the largest weight error."""
    weights = {f"{owner}.weight": fmt for owner, fmt in plan.items()}
    packed, error = {}, 0.0
    for weight, fmt in weights.items():
        merged = gm.get_parameter(weight).detach()
        packed[weight] = quantized.store(gm, weight, False, fmt)
        restored = quantized.restore(packed[weight], fmt, merged.shape[1], merged.shape[0])
        error = max(error, (restored - merged).abs().max().item())
    for proj in later_first(gm, [p for p in GraphQuery(gm).projections if p.weight in weights]):
        quantized.replace(gm, proj.node, proj.input, quantized.projection_bias(proj.node), proj.weight.rpartition(".")[0],
                          packed[proj.weight], proj.in_features, proj.out_features, weights[proj.weight])
    gm.graph.eliminate_dead_code()
    for weight in weights:
        remove_tensor(gm, weight)
    gm.recompile()
    return error


def _outputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The graph's outputs in eval mode on a fixed batch."""
    inputs = example_inputs(list(info(gm).input_names or DEFAULT_INPUT_NAMES), vocab_size(gm), batch=2, seq=8)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            return [t.float() for t in pytree.tree_leaves(gm(**inputs)) if isinstance(t, torch.Tensor)]
    finally:
        gm.train(was_training)
