"""Low-rank branches on embedding lookups, PEFT's `lora.Embedding`: `W0[ids] + scale * (B @ A).T[ids]`.

A lookup `aten.embedding(W, ids)` of a 2-D parameter `W` `[vocab, dim]` is a projection of one-hot ids by a
weight stored `[in, out]`, so a `Lookup` is a `Projection` (`transposed`, in = vocab, out = dim) and LoRA's
scale, rank checks, slots and fold carry over: the fold adds `scale * (B @ A).T` to `W`. What differs is
PEFT's: the factors `<module>.lora_embedding_A` `[rank, vocab]` and `.lora_embedding_B` `[dim, rank]`
(parameters, no `.weight`), A zero and B standard normal at init, A gathered by id (`padding_idx` as the base
lookup's, so the pad column takes no gradient) and no dropout. The branch joins the lookup's own output, so a
scale the embedding module applies after it (Gemma's `embed_scale`) scales the branch as PEFT does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.ir import tag, tensor_at
from rewrite.graph.nodes import NodeBuilder
from rewrite.graph.query import Projection, module_path

aten = torch.ops.aten


@dataclass(frozen=True)
class Lookup(Projection):
    """`W[ids]`: `input` holds the ids, `weight` names `W` `[vocab, dim]`; `padding_idx` is the lookup's (-1: none),
    `renorms` whether it renormalizes the rows it reads first (`nn.Embedding(max_norm=...)`)."""

    padding_idx: int = -1
    renorms: bool = False

    @property
    def quantized(self) -> bool:
        return quantized.is_quantized_lookup(self.node)


def lookups(gm: fx.GraphModule) -> list[Lookup]:
    """Every embedding lookup of a 2-D parameter in the base model (not a table a pass added), and every quantized
    lookup (which `check` refuses, so that targeting one says why)."""
    found = []
    for node in gm.graph.find_nodes(op="call_function", target=quantized.GATHER):
        table = node.args[0].target
        found.append(Lookup(node, node.args[1], table, module_path(node) or table.rpartition(".")[0], True,
                            int(tensor_at(gm, table).shape[0]), node.args[4]))
    for node in gm.graph.find_nodes(op="call_function", target=aten.embedding.default):
        table = node.args[0]
        if tag(node) or table.op != "get_attr":
            continue
        weight = tensor_at(gm, table.target)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            vocab, dim = weight.shape
            path = module_path(node) or table.target.rpartition(".")[0]
            padding = node.args[2] if len(node.args) > 2 else -1
            found.append(Lookup(node, node.args[1], table.target, path, True, int(vocab), int(dim), padding,
                                _renorms(table)))
    return found


def _renorms(table: fx.Node) -> bool:
    """Whether the table's rows are renormalized in place before lookups (`embedding_renorm_`, maybe on a detach)."""
    return any(node.target is aten.embedding_renorm_.default for user in table.users for node in (user, *user.users))


def check(lookup: Lookup) -> None:
    """Refuses a lookup whose branch would not be PEFT's or could not fold."""
    if lookup.quantized:
        raise RewriteError(f"LoRA on the embedding {lookup.path} is not supported: its table is quantized, and a "
                           "quantized embedding has no float weight to adapt or fold into; leave it out of the "
                           "targets, or quantize without embeddings")
    if lookup.renorms:
        raise RewriteError(f"LoRA on the embedding {lookup.path} is not supported: it renormalizes the rows it looks "
                           "up (max_norm), which PEFT does to A's columns too, in place, and no fold reproduces; "
                           "leave it out of the targets")


def factor_names(path: str) -> tuple[str, str]:
    """PEFT's names of an embedding branch's A and B (its file keys, without `.weight`)."""
    return f"{path}.lora_embedding_A", f"{path}.lora_embedding_B"


def initialize(base: torch.Tensor, lookup: Lookup, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's init, the reverse of a linear branch's: A `[rank, vocab]` zero, B `[dim, rank]` ~ N(0, 1), float32
    on a half-precision base (PEFT ignores the gaussian option here)."""
    dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
    a = torch.zeros(rank, lookup.in_features, device=base.device, dtype=dtype)
    b = torch.empty(lookup.out_features, rank, device=base.device, dtype=dtype)
    return a, nn.init.normal_(b)


def register(gm: fx.GraphModule, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """A and B as parameters of the embedding module, where PEFT keeps them."""
    module = gm.get_submodule(path)
    for name, value in zip(factor_names(path), (a, b)):
        module.register_parameter(name.rpartition(".")[2], nn.Parameter(value))


def branch(node: NodeBuilder, lookup: Lookup, scale: float, base_dtype: torch.dtype) -> fx.Node:
    """`scale * B(A.T[ids])` in the base's dtype (no dropout: PEFT's embedding branch has none)."""
    a_name, b_name = factor_names(lookup.path)
    lora_dtype = tensor_at(node.graph.owning_module, a_name).dtype
    h = node(aten.embedding.default, node(aten.t.default, node.attr(a_name)), lookup.input, lookup.padding_idx)
    h = node(aten.linear.default, h, node.attr(b_name))
    h = node(aten.mul.Tensor, h, scale)
    return node.to_dtype(h, lora_dtype, base_dtype)
