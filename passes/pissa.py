"""PiSSA and OLoRA: LoRA whose branch starts from W0's principal part, PEFT's `init_lora_weights` "pissa",
"pissa_niter_N" and "olora" bit for bit (one pass, as one PEFT field picks either).

PiSSA's A, B are W0's top-r singular triplets (`niter`: `torch.svd_lowrank`, drawing from the global RNG in
PEFT's order, so the same `torch.manual_seed` gives PEFT's factors); OLoRA's the first r columns of Q and rows
of R, W0 = QR. The base weight becomes the residual `W0 - s·B·A` (written in place, journalled, so a failing
pipeline puts W0 back); the branch and the fold (`W_res + s·B·A`, PEFT's merge_and_unload) are LoRA's.

The initial A0, B0 stay as buffers beside the branch (removed by the fold), so the adapter file is what PEFT
writes with `path_initial_model_for_weight_conversion`: a standard LoRA of rank 2r, A' = [A; A0], B' = [B, -B0],
alphas doubled (times sqrt 2 with rsLoRA), which gives the trained model on the ORIGINAL base. Where PEFT
refuses or errs, this is exact: rsLoRA with patterns, a seq-cls head (PEFT's conversion drops it), OLoRA on
GPT-2's Conv1D (we factor the `[out, in]` weight; PEFT the stored `[in, out]` one, and fails). Adapter slots
take adapters for the original base (the slot export restores W0). An unconverted PEFT adapter is applied as
PEFT applies it, the init run again on the graph's (original) weights; pissa_niter_N ones are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import fx, nn

from rewrite.adapters.low_rank import LowRank, lora_names
from rewrite.adapters.peft_files import PREFIX
from rewrite.errors import RewriteError
from rewrite.graph.ir import add_submodule, remove_tensor, tensor_at
from rewrite.graph.pipeline import AdapterFiles, Folded, option, register
from rewrite.graph.query import Projection
from rewrite.graph.transaction import overwrite

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CONVERT = "save it from PEFT with path_initial_model_for_weight_conversion (a standard LoRA adapter) and load that"


def initial_names(path: str) -> tuple[str, str]:
    """The buffers holding a branch's initial A0 and B0."""
    return f"{path}.lora_initial.A", f"{path}.lora_initial.B"


@register
@dataclass
class PissaPass(LowRank):
    name = "pissa"
    title = "PiSSA/OLoRA"
    reads_base_weight = True
    peft_inits = ("pissa", "olora")

    init: Literal["pissa", "olora"] = option("pissa", "pissa: SVD of W0; olora: QR of W0", label="PiSSA init")
    niter: int | None = option(None, "PiSSA's randomized SVD with this many subspace iterations (PEFT's "
                                      "pissa_niter_N; draws from torch's global RNG); default: the full SVD")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.niter is not None and (self.init != "pissa" or isinstance(self.niter, bool)
                                       or not isinstance(self.niter, int) or self.niter < 0):
            raise RewriteError(f"{self.title} niter {self.niter!r} is not allowed; use a whole number of at least 0, "
                               "with init pissa")

    def initialize(self, gm: fx.GraphModule, proj: Projection, rank: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's factors of W0 (fp32, `[out, in]`); the residual goes into the base weight, A0 and B0 into buffers."""
        weight = tensor_at(gm, proj.weight)
        if weight.dtype not in _DTYPES or weight.device.type == "meta":
            raise RewriteError(f"{self.title} needs {proj.path}'s weight in float32, float16 or bfloat16, not "
                               f"{weight.dtype} on {weight.device.type}; capture the model with its weights")
        nn.Linear(proj.in_features, rank, bias=False)  # PEFT builds A's and B's modules before factoring W0:
        nn.Linear(rank, proj.out_features, bias=False)  # the same random draws, so `niter` sees PEFT's RNG state
        w = weight.detach().float()
        w = w.T if proj.transposed else w
        a, b = self.factors(w, rank, scale)
        residual = (w - scale * b @ a).to(weight.dtype)
        overwrite(weight, residual.T if proj.transposed else residual)
        holder = nn.Module()
        for name, value in zip(("A", "B"), (a, b)):
            holder.register_buffer(name, value.clone())
        add_submodule(gm, initial_names(proj.path)[0].rpartition(".")[0], holder)
        return a, b

    def factors(self, w: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A `[rank, in]`, B `[out, rank]` with PEFT's operations: `scale·B·A` is W's top singular part (PiSSA) or
        `scale` times its first QR part (OLoRA)."""
        if self.init == "olora":
            q, r = torch.linalg.qr(w)
            return r[:rank].contiguous(), q[:, :rank].contiguous()
        if self.niter is None:
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :rank], s[:rank] / scale, uh[:rank]
        else:
            vr, sr, ur = torch.svd_lowrank(w, rank, niter=self.niter)
            sr, uhr = sr / scale, ur.t()
        return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))

    @classmethod
    def converted(cls, gm: fx.GraphModule, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's conversion to a LoRA on the original base: `[A; A0]` and `[B, -B0]`."""
        a, b, a0, b0 = (tensor_at(gm, name).detach() for name in (*lora_names(path), *initial_names(path)))
        return torch.cat([a, a0], 0), torch.cat([b, -b0], 1)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["PissaPass"]) -> AdapterFiles:
        """The adapter PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` writes."""
        files = super().adapter_files(gm, runs)
        config, tensors = dict(files.config), dict(files.tensors)
        grow = math.sqrt(2) if config["use_rslora"] else 2
        config.update(init_lora_weights=True, r=2 * config["r"], lora_alpha=config["lora_alpha"] * grow,
                      rank_pattern={key: 2 * value for key, value in config["rank_pattern"].items()},
                      alpha_pattern={key: value * grow for key, value in config["alpha_pattern"].items()})
        for path in cls._present(gm):
            for name, value in zip(lora_names(path), cls.converted(gm, path)):
                tensors[PREFIX + name] = value.contiguous().cpu()
        return AdapterFiles(config, tensors)

    @classmethod
    def peft_init(cls, value: Any) -> str:
        if isinstance(value, str) and value.lower() in cls.peft_inits:
            return value.lower()
        raise RewriteError(f"an adapter made with PEFT's init_lora_weights {value!r} holds weights for a residual base "
                           f"that cannot be rebuilt here (only 'pissa' and 'olora' can); {_CONVERT}")

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise RewriteError(f"an unconverted {cls.title} adapter holds weights for its residual base, and adapter slots "
                           f"take adapters for the original base; {_CONVERT}")

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence["PissaPass"]) -> None:
        """The copy's base weights back to W0 and its branches holding the converted factors, so the slots take
        adapters for the original base (no adapter: the base model; this graph's: its converted factors)."""
        for path, site in cls._present(gm).items():
            a0, b0 = (tensor_at(gm, name).detach().float() for name in initial_names(path))
            start = (site.scale * b0 @ a0).T if site.transposed else site.scale * b0 @ a0
            overwrite(tensor_at(gm, site.weight), tensor_at(gm, site.weight).detach().float() + start)
            for name, value in zip(lora_names(path), cls.converted(gm, path)):
                tensor_at(gm, name).data = value
            for name in initial_names(path):
                remove_tensor(gm, name)
        super().prepare_slots(gm, runs)

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["PissaPass"]) -> Folded | None:
        """LoRA's fold into the residual; the initial factors go with the branch."""
        folded = super().fold(gm, runs)
        for path in folded.items if folded else []:
            for name in initial_names(path):
                remove_tensor(gm, name)
        return folded
