"""Merging low-rank branches into their base weights: `W0 += scale * B @ A`, then the branch is erased.

The sum is taken in fp32 and cast back to W0's dtype, transposed for `[in, out]` weights (GPT-2's
Conv1D); a merge that would write non-finite weights is refused before anything changes. Branches are
found by the tags their pass put on the nodes (`lora_add` with target, weight, scale, transposed).
"""
from __future__ import annotations

import torch
from torch import fx

from rewrite.errors import RewriteError
from rewrite.ir import remove_submodule, tag, tensor_at
from rewrite.transaction import overwrite
from rewrite.params import forget_trainable, non_finite


def _merged_weight(gm: fx.GraphModule, path: str, weight: str, scale: float, transposed: bool) -> torch.Tensor:
    base = tensor_at(gm, weight)
    lora_a = tensor_at(gm, f"{path}.lora_A.weight").detach().float()
    lora_b = tensor_at(gm, f"{path}.lora_B.weight").detach().float()
    delta = scale * (lora_b @ lora_a)
    merged = base.detach().float() + (delta.T if transposed else delta)
    if non_finite([(path, merged)]):
        raise RewriteError(f"folding the LoRA branch of {path} gives non-finite weights; the adapter is corrupt")
    return merged.to(base.dtype)


def _erase_branches(gm: fx.GraphModule, adds: list[fx.Node], pass_name: str) -> None:
    paths = {tag(add)["target"] for add in adds}
    for add in adds:
        add.replace_all_uses_with(add.args[0])
    for node in reversed(list(gm.graph.nodes)):
        if tag(node).get("pass") == pass_name and tag(node).get("target") in paths:
            gm.graph.erase_node(node)


def merge_branches(gm: fx.GraphModule, pass_name: str) -> list[str]:
    """Merges and erases every low-rank branch the pass `pass_name` inserted; returns the module paths folded."""
    adds = [n for n in gm.graph.nodes if tag(n).get("lora_add")]
    sites: dict[str, fx.Node] = {}
    for add in adds:
        sites.setdefault(tag(add)["target"], add)
    merged = {path: _merged_weight(gm, path, tag(add)["weight"], tag(add)["scale"], tag(add)["transposed"])
              for path, add in sites.items()}
    for path, weight in merged.items():
        overwrite(tensor_at(gm, tag(sites[path])["weight"]), weight)
    _erase_branches(gm, adds, pass_name)
    for path in sites:
        remove_submodule(gm, f"{path}.lora_A")
        remove_submodule(gm, f"{path}.lora_B")
    forget_trainable(gm, [f"{path}.{ab}.weight" for path in sites for ab in ("lora_A", "lora_B")])
    return list(sites)
