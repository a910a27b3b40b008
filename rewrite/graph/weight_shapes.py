"""Weights of another shape than the graph needs, named before an export or a training run meets them.

Archives store no shapes and a weight's shape is only wrong for the ops that read it, so the graph is run
once on small inputs, node by node, on fake tensors (shapes without data: the check reads no weight, so a
model mapped from its archive is not paged in by it); an op that cannot use a weight names it, with the
shape the model's config gives it where the config knows the tensor.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from rewrite.graph.capture import config_shapes
from rewrite.errors import RewriteError
from rewrite.graph.ir import info, tensor_at
from rewrite.graph.signature import vocab_size
from rewrite.graph.synthetic_inputs import example_inputs


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else repr(value)


def _weights_near(node: fx.Node) -> list[fx.Node]:
    """The weights an op reads: directly, else those its inputs' ops read (a wrong weight and bias pass a
    linear and fail at the residual add after it)."""
    direct = [n for n in node.all_input_nodes if n.op == "get_attr"]
    return direct or [w for n in node.all_input_nodes for w in n.all_input_nodes if w.op == "get_attr"]


class _WeightCheck(fx.Interpreter):
    """Runs the graph node by node: an op that cannot use a weight's shape is named, with the weight and
    the shape the model's config gives it (archives store no shapes; the graph's ops are what need them)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # the message names the node; fx would append the graph's source

    def run_node(self, node: fx.Node):
        try:
            return super().run_node(node)
        except (RuntimeError, IndexError) as error:
            weights = _weights_near(node)
            if not weights:
                raise
            raise RewriteError(self._mismatch(node, weights)) from error

    def _mismatch(self, node: fx.Node, weights: list[fx.Node]) -> str:
        graph_info = info(self.module)
        expected = config_shapes(graph_info.config, graph_info.task)
        for weight in weights:
            shape = tuple(tensor_at(self.module, weight.target).shape)
            if weight.target in expected and expected[weight.target] != shape:
                return (f"weight {weight.target} has shape {shape} but the model's config gives it "
                        f"{expected[weight.target]}; the weights do not match the graph (re-create the archive)")
        others = [_shape(self.env[n]) for n in node.all_input_nodes if n not in weights]
        read = ", ".join(f"{w.target} {_shape(tensor_at(self.module, w.target))}" for w in weights)
        return (f"the graph's {node.target} at node {node.name} cannot use weight {read} with inputs of shape "
                f"{', '.join(others) or 'none'}; the weights do not match the graph (re-create the archive)")


def check_weight_shapes(gm: fx.GraphModule) -> None:
    """A tensor of another shape than the graph expects is refused before export or training meets it."""
    device = next(gm.parameters()).device
    if device.type == "meta":
        return  # shapes without values: nothing can disagree with what capture recorded
    names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        _WeightCheck(gm).run(*(t.to(device) for t in example_inputs(names, vocab_size(gm)).values()))
