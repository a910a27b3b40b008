"""DoRA (weight-decomposed LoRA), PEFT's `use_dora`: `W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖`, a learned
magnitude per output row times the direction of LoRA's weight.

As graph nodes, as PEFT computes it: `ratio = m / ‖W0 + s·BA‖` (recomputed every forward, the norm detached
as in the paper) rescales the base output without its bias, `y + (ratio - 1)·(y - b) + ratio·s·B(A(x))`;
with dropout, PEFT's training form runs the base matmul again on the dropped input,
`y + (ratio - 1)·W0·d(x) + ratio·s·B(A(d(x)))` (the same in eval mode, where dropout is off). The magnitude
`<module>.lora_magnitude_vector` `[out]` starts at the row norms of `W0 + s·BA` (`‖W0‖`: B starts at zero)
and is PEFT's file key. The fold writes `W'` (per column of GPT-2's `[in, out]` Conv1D weights). Adapter
slots: A, B (carrying s) and m, whose no-adapter value is `‖W0‖` (ratio 1); mixed batches are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn

from rewrite.adapters import branches
from rewrite.adapters.low_rank import LowRank, lora_names
from rewrite.adapters.slots import Slot, dtype_name
from rewrite.graph.ir import tensor_at
from rewrite.graph.pipeline import register
from rewrite.graph.query import Projection

aten = torch.ops.aten
MIXED_REFUSAL = ("DoRA adapters cannot be mixed per row: each rescales its base outputs by its magnitude over the "
                 "norm of its own W0 + s·BA, which has no per-row form here (PEFT refuses mixed DoRA batches too); "
                 "export with --adapter-slots and serve one adapter per call")


MAGNITUDE = "lora_magnitude_vector"
BASE_NORM = "lora_base_norm"  # the slot export's `‖W0‖` per output row: the magnitude slot's no-adapter value


def magnitude(path: str) -> str:
    """PEFT's name of a module's magnitude vector (its file key, without `.weight`)."""
    return f"{path}.{MAGNITUDE}"


def _bias(node: fx.Node) -> fx.Node | None:
    """The bias a projection node adds (PEFT subtracts it before rescaling the base output)."""
    if node.target is aten.linear.default:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0] if node.target is aten.addmm.default else None


def _rows(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as `[out, in]`."""
    return weight.T if transposed else weight


@register
@dataclass
class DoraPass(LowRank):
    name = "dora"
    title = "DoRA"
    reads_base_weight = True
    peft_flags = {"use_dora": True}

    def initialize(self, gm: fx.GraphModule, proj: Projection, rank: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA's A and B, and the magnitude `‖W0 + s·BA‖` per output row."""
        a, b = super().initialize(gm, proj, rank, scale)
        weight = _rows(tensor_at(gm, proj.weight).detach().to(a.dtype), proj.transposed)
        norms = torch.linalg.vector_norm(weight + scale * (b @ a), dim=1)
        gm.get_submodule(proj.path).register_parameter(MAGNITUDE, nn.Parameter(norms))
        return a, b

    def insert(self, gm: fx.GraphModule, proj: Projection, scale: float, record: dict) -> None:
        """PEFT's forward (see the module docstring); the branch reads the base output `y` itself."""
        y = proj.node
        node = branches.builder(gm, y, self.name, proj.path)
        with gm.graph.inserting_before(y.next):
            x = self.branch_input(gm, node, proj)
            weight = node.attr(proj.weight)
            weight = node(aten.t.default, weight) if proj.transposed else weight
            ratio = self.ratio(gm, node, proj, weight, scale)
            if self.dropout > 0:
                base = node(aten.linear.default, x, weight)
            else:
                bias = _bias(y)
                base = y if bias is None else node(aten.sub.Tensor, y, bias)
            lora = self.low_rank(gm, node, proj, scale, x)
            rescaled = node(aten.mul.Tensor, node(aten.sub.Tensor, ratio, 1), base)
            out = node(aten.add.Tensor, y, node(aten.add.Tensor, rescaled, node(aten.mul.Tensor, ratio, lora)))
        self.attach(proj, out, scale, record, keep=node.created)

    @staticmethod
    def ratio(gm: fx.GraphModule, node, proj: Projection, weight: fx.Node, scale: float) -> fx.Node:
        """`m / ‖W0 + s·BA‖` `[out]` in the base's dtype, the norm detached (`weight` is W0 as `[out, in]`)."""
        a_name, b_name = lora_names(proj.path)
        delta = node(aten.mm.default, node(aten.mul.Tensor, node.attr(b_name), scale), node.attr(a_name))
        norm = node(aten.linalg_vector_norm.default, node(aten.add.Tensor, weight, delta), 2, [1])
        ratio = node(aten.div.Tensor, node.attr(magnitude(proj.path)), node(aten.detach.default, norm))
        return node.to_dtype(ratio, tensor_at(gm, a_name).dtype, tensor_at(gm, proj.weight).dtype)

    @classmethod
    def merge(cls, gm: fx.GraphModule, site: branches.BranchSite) -> dict[str, torch.Tensor]:
        """`m / ‖W0 + s·BA‖ ⊙ (W0 + s·BA)` in fp32, per output row (a column of an `[in, out]` weight)."""
        merged = super().merge(gm, site)[site.weight]
        norm = torch.linalg.vector_norm(merged, dim=0 if site.transposed else 1, keepdim=True)
        return {site.weight: tensor_at(gm, magnitude(site.path)).detach().float().view(norm.shape) / norm * merged}

    @classmethod
    def extra_tensors(cls, path: str) -> list[str]:
        return [magnitude(path)]

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence[LowRank]) -> list[Slot]:
        """LoRA's A and B, and each magnitude, empty as `‖W0‖` (ratio 1 at rank 0) and refused per row."""
        slots = super().adapter_slots(gm, runs)
        for path in cls._present(gm):
            value = tensor_at(gm, magnitude(path))
            slots.append(Slot(magnitude(path), tuple(value.shape), dtype_name(value), f"{path}.{BASE_NORM}",
                              group=path, no_per_row=MIXED_REFUSAL))
        return slots

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence[LowRank]) -> None:
        """B's slot carries s in the norm too; each module keeps `‖W0‖` for its magnitude slot's default."""
        super().prepare_slots(gm, runs)
        for site in branches.sites(gm, cls.name):
            for read in gm.graph.find_nodes(op="get_attr", target=lora_names(site.path)[1]):
                for user in [u for u in read.users if u.target is aten.mul.Tensor and u.args[1] == site.scale]:
                    user.replace_all_uses_with(read)
                    gm.graph.erase_node(user)
        for path, site in branches.by_path(branches.sites(gm, cls.name)).items():
            weight = _rows(tensor_at(gm, site.weight).detach(), site.transposed)
            norms = torch.linalg.vector_norm(weight.to(tensor_at(gm, magnitude(path)).dtype), dim=1)
            gm.get_submodule(path).register_buffer(BASE_NORM, norms)
