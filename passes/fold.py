"""Fold: merge every LoRA branch into its base weight, `W0 += scale * B @ A`, and erase the branch;
evaluate every trained prompt encoder once and replace it by its constant table.

The sum is taken in fp32 and cast back to W0's dtype (transposed for `[in, out]` weights such as
GPT-2's Conv1D). A folded graph is node for node the base capture: deployment pays nothing. A
P-tuning encoder (LSTM/MLP over its input embeddings) takes no data, so its output is a constant:
the folded graph keeps only that table and one gather, and its ONNX model has no LSTM.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.errors import RewriteError
from rewrite.graph import GraphQuery
from rewrite.ir import add_submodule, copy_meta, remove_submodule, tag, tensor_at
from rewrite.params import forget_trainable
from rewrite.pipeline import Pass, register

log = logging.getLogger(__name__)


def _merged_weight(gm: fx.GraphModule, path: str, weight: str, scale: float, transposed: bool) -> torch.Tensor:
    base = tensor_at(gm, weight)
    lora_a = tensor_at(gm, f"{path}.lora_A.weight").detach().float()
    lora_b = tensor_at(gm, f"{path}.lora_B.weight").detach().float()
    delta = scale * (lora_b @ lora_a)
    merged = base.detach().float() + (delta.T if transposed else delta)
    if merged.device.type != "meta" and not torch.isfinite(merged).all():
        raise RewriteError(f"folding the LoRA branch of {path} gives non-finite weights; the adapter is corrupt")
    return merged.to(base.dtype)


def _erase_branches(gm: fx.GraphModule, adds: list[fx.Node]) -> None:
    paths = {tag(add)["target"] for add in adds}
    for add in adds:
        add.replace_all_uses_with(add.args[0])
    for node in reversed(list(gm.graph.nodes)):
        if tag(node).get("pass") == "lora" and tag(node).get("target") in paths:
            gm.graph.erase_node(node)


def fold_lora(gm: fx.GraphModule) -> list[str]:
    """Merges and erases every LoRA branch; returns the module paths folded."""
    adds = [n for n in gm.graph.nodes if tag(n).get("lora_add")]
    sites: dict[str, fx.Node] = {}
    for add in adds:
        sites.setdefault(tag(add)["target"], add)
    merged = {path: _merged_weight(gm, path, tag(add)["weight"], tag(add)["scale"], tag(add)["transposed"])
              for path, add in sites.items()}
    for path, weight in merged.items():
        with torch.no_grad():
            tensor_at(gm, tag(sites[path])["weight"]).copy_(weight)
    _erase_branches(gm, adds)
    for path in sites:
        remove_submodule(gm, f"{path}.lora_A")
        remove_submodule(gm, f"{path}.lora_B")
    forget_trainable(gm, [f"{path}.{ab}.weight" for path in sites for ab in ("lora_A", "lora_B")])
    return list(sites)


def _evaluate(gm: fx.GraphModule, output: fx.Node, nodes: set[fx.Node]) -> torch.Tensor:
    """Runs the data-free subgraph `nodes` (which computes `output`) once, over `gm`'s parameters."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in nodes:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[output])
    with torch.no_grad():
        return fx.GraphModule(gm, graph)().detach()


def fold_prompt_encoders(gm: fx.GraphModule) -> list[str]:
    """Replaces each prompt encoder by its output table at `<encoder>.embedding.weight`; returns the encoders folded."""
    folded = []
    for table in [n for n in gm.graph.nodes if tag(n).get("prompt_table")]:
        path, made_by = tag(table)["prompt_table"], tag(table)["pass"]
        upstream = nx.ancestors(GraphQuery(gm).digraph, table) | {table}
        encoder_nodes = {n for n in upstream if tag(n).get("pass") == made_by}
        value = _evaluate(gm, table, encoder_nodes)
        if value.device.type != "meta" and not torch.isfinite(value).all():
            raise RewriteError(f"folding the prompt encoder {path} gives non-finite values; the encoder is corrupt")
        names = [f"{path}.{name}" for name, _ in gm.get_submodule(path).named_parameters()]
        remove_submodule(gm, path)
        add_submodule(gm, f"{path}.embedding", nn.Embedding.from_pretrained(value, freeze=True))
        with gm.graph.inserting_before(table):
            constant = gm.graph.get_attr(f"{path}.embedding.weight")
        copy_meta(table, constant, **{"pass": made_by})
        table.replace_all_uses_with(constant)
        for node in reversed(list(gm.graph.nodes)):
            if node in encoder_nodes:
                gm.graph.erase_node(node)
        forget_trainable(gm, names)
        folded.append(path)
    return folded


@register
@dataclass
class FoldPass(Pass):
    name = "fold"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        folded = fold_lora(graph_module)
        encoders = fold_prompt_encoders(graph_module)
        if not folded and not encoders:
            log.warning("fold: nothing to fold (the graph has no LoRA branches or prompt encoders); "
                        "the graph is unchanged")
        parts = []
        if folded:
            parts.append(f"{len(folded)} LoRA branches")
        if encoders:
            parts.append(f"{len(encoders)} prompt encoder into a constant table")
        self.report = {
            "folded": folded,
            "prompt_encoders": encoders,
            "summary": f"folded {' and '.join(parts)}" if parts else "nothing to fold",
        }
        return PassResult(graph_module, bool(folded or encoders))
