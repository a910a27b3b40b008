"""Gated activation: `act(gate) * up` saves gate and up only, and recomputes `act(gate)` in the backward.

A gated MLP (LLaMA's SwiGLU, GeGLU) computes `act(gate) * up`. Autograd saves `gate` for the
activation's backward and both `act(gate)` and `up` for the product's: three `[tokens, intermediate]`
tensors per layer, the largest activations a LoRA-on-attention model keeps. `gated` saves two and
recomputes the activation (one element-wise op) when the gradient is needed, with the same kernels
autograd would run, so the numbers are the plain graph's bit for bit. What Unsloth does by hand per
architecture, done here for every graph with the pattern (SiLU, GELU, ReLU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.graph.ir import copy_meta
from rewrite.training.speed import SpeedPass
from rewrite.graph.pipeline import Pass, register

aten = torch.ops.aten
_ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu"}


def _activation(kind: str, gate: torch.Tensor, approximate: str) -> torch.Tensor:
    if kind == "gelu":
        return aten.gelu.default(gate, approximate=approximate)
    return aten.silu.default(gate) if kind == "silu" else aten.relu.default(gate)


def _activation_backward(kind: str, grad: torch.Tensor, gate: torch.Tensor, approximate: str) -> torch.Tensor:
    """What autograd's own backward of the activation computes."""
    if kind == "gelu":
        return aten.gelu_backward.default(grad, gate, approximate=approximate)
    if kind == "silu":
        return aten.silu_backward.default(grad, gate)
    return aten.threshold_backward.default(grad, aten.relu.default(gate), 0)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind, approximate):
        ctx.kind, ctx.approximate = kind, approximate
        ctx.save_for_backward(gate, up)
        return _activation(kind, gate, approximate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        want_gate, want_up = ctx.needs_input_grad[:2]
        grad_gate = _activation_backward(ctx.kind, grad * up, gate, ctx.approximate) if want_gate else None
        grad_up = grad * _activation(ctx.kind, gate, ctx.approximate) if want_up else None
        return grad_gate, grad_up, None, None


def gated(gate: torch.Tensor, up: torch.Tensor, kind: str, approximate: str = "none") -> torch.Tensor:
    """`act(gate) * up` (act: "silu", "gelu" with `approximate`, "relu"), saving gate and up only."""
    return _Gated.apply(gate, up, kind, approximate)


def _gated_product(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(activation node, up) when `node` is `act(gate) * up` (either order) and the product alone reads act."""
    if node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    for act, up in (node.args, node.args[::-1]):
        if (isinstance(act, fx.Node) and act.target in _ACTIVATIONS and len(act.users) == 1
                and isinstance(up, fx.Node) and up is not act):
            return act, up
    return None


@register
@dataclass
class GatedActivationPass(Pass):
    name = "gated_activation"
    speed = SpeedPass(after=("rows", "fast_dropout"))  # `rows` moves nodes through the MLP it fuses

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        found = [(node, *match) for node in graph.find_nodes(op="call_function", target=aten.mul.Tensor)
                 if (match := _gated_product(node))]
        for product, act, up in found:
            with graph.inserting_before(product):
                new = graph.call_function(gated, (act.args[0], up, _ACTIVATIONS[act.target],
                                                  act.kwargs.get("approximate", "none")))
            copy_meta(product, new, **{"pass": self.name})
            product.replace_all_uses_with(new)
            graph.erase_node(product)
            graph.erase_node(act)
        self.report = {"gated": len(found),
                       "summary": f"{len(found)} gated activations recomputed in the backward" if found
                       else "no gated activation"}
        return PassResult(graph_module, bool(found))
