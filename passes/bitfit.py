"""BitFit (Ben Zaken et al., 2022): train only the bias terms of a model (and a fresh seq-cls head).

The smallest useful pass, and the example of README's "Writing a pass": everything the rest of the
system needs to know about it lives in this file. The rewrite marks biases trainable and changes no
node; its adapter files hold the trained biases under PEFT-style keys (`BITFIT` is not a PEFT type, so
only `rewrite.load_adapter` reads them); export records how many biases were tuned; fold has nothing
to merge (the biases are the model's own), so it hands them back to the base weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters.peft_files import PREFIX, adapter_base, peft_task_type
from rewrite.errors import RewriteError
from rewrite.graph.query import GraphQuery, matches_module
from rewrite.graph.ir import info
from rewrite.graph.params import apply_trainable, forget_trainable, mark_trainable, trainable_heads
from rewrite.graph.pipeline import AdapterFiles, Folded, Pass, Pipeline, option, register


@register
@dataclass
class BitFitPass(Pass):
    """Bias-only tuning: every bias (or only the projections'), optionally only in some modules."""

    name = "bitfit"
    title = "BitFit"
    peft_types = ("BITFIT",)

    scope: Literal["all", "linear"] = option("all", "which biases train: all (norms too, as the paper) or linear "
                                                    "(projections only)", label="BitFit scope")
    targets: str | list[str] | None = option(None, "only biases of these modules (names or .suffix, or a regex)")
    modules_to_save: list[str] | None = option(
        None, "modules trained and saved in full (default: the head of a seq-cls graph, like PEFT)")

    def biases(self, gm: fx.GraphModule) -> list[str]:
        """The bias parameters this pass trains."""
        linear = {p.path for p in GraphQuery(gm).projections}
        found = [name for name, param in gm.named_parameters() if name.endswith(".bias") and param.dim() == 1
                 and (self.scope == "all" or name.removesuffix(".bias") in linear)
                 and (self.targets is None or matches_module(name.removesuffix(".bias"), self.targets))]
        if not found:
            raise RewriteError(f"BitFit finds no bias to train (scope {self.scope}, targets {self.targets!r}); "
                               "this model has none there")
        return found

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        biases = self.biases(gm)
        heads = trainable_heads(gm, self.modules_to_save)
        mark_trainable(gm, biases + heads)
        count = sum(gm.get_parameter(name).numel() for name in biases)
        self.report = {"biases": biases, "summary": f"{len(biases)} biases train ({count:,d} parameters)"}
        return PassResult(gm, False)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["BitFitPass"]) -> AdapterFiles:
        config = {"peft_type": "BITFIT", "task_type": peft_task_type(gm), "base_model_name_or_path": info(gm).source,
                  "scope": runs[-1].scope, "targets": runs[-1].targets, "modules_to_save": info(gm).modules_to_save}
        return AdapterFiles(config, adapter_base(gm))

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     origin: str) -> dict[str, str]:
        modules = config.get("modules_to_save")
        Pipeline([cls(scope=config["scope"], targets=config.get("targets"), modules_to_save=modules)]).run(gm)
        return {key.removeprefix(PREFIX): key for key in weights}

    @classmethod
    def serving_metadata(cls, gm: fx.GraphModule, runs: Sequence["BitFitPass"]) -> dict[str, str]:
        return {"rewrite.bitfit_biases": json.dumps(len(runs[-1].report["biases"]))}

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["BitFitPass"]) -> Folded | None:
        biases = [name for run in runs for name in run.report["biases"] if name in info(gm).trainable]
        forget_trainable(gm, biases)
        apply_trainable(gm)
        return Folded("biases", biases, f"{len(biases)} tuned biases into the base weights") if biases else None
