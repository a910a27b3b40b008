"""Train/eval switching for captured graphs.

`torch.export` bakes the module mode into the graph as literal flags (`aten.dropout(x, p, train)`,
`aten.batch_norm(..., training, ...)`, SDPA's `dropout_p`; the same in `rewrite.graph.dropout`'s stand-ins
for dropout and SDPA). Capture traces in train mode so every probability is recorded; switching
modes rewrites those literals (torchao's `move_exported_model_to_train` is the same idea).
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from rewrite.graph import dropout

aten = torch.ops.aten

# op -> index of its boolean "train" argument
_FLAG_ARG = {
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.batch_norm.default: 5,
    dropout.dropout: 2,
}
_ATTENTION = (aten.scaled_dot_product_attention.default, dropout.attention)  # dropout_p at _SDPA_DROPOUT_ARG
_SDPA_DROPOUT_ARG = 4
_TRAIN_P = "rewrite_train_dropout_p"


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.update_kwarg(name, value)


def _sdpa_dropout(node: fx.Node) -> float:
    if len(node.args) > _SDPA_DROPOUT_ARG:
        return node.args[_SDPA_DROPOUT_ARG]
    return node.kwargs.get("dropout_p", 0.0)


def train_dropout_p(node: fx.Node) -> float:
    """The probability with which a dropout or attention node drops in train mode (0.0 for other nodes)."""
    if node.target in _ATTENTION:
        return node.meta.get(_TRAIN_P, _sdpa_dropout(node))
    if node.target in (aten.dropout.default, dropout.dropout):
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
    return 0.0


def set_graph_training(gm: fx.GraphModule, mode: bool) -> None:
    """Rewrites every mode literal in `gm`, and in graphs it calls (the checkpoint pass's blocks), to
    `mode`, and recompiles what changed."""
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            _set_training(module, mode)


def _set_training(gm: fx.GraphModule, mode: bool) -> None:
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _FLAG_ARG:
            index = _FLAG_ARG[node.target]
            current = node.args[index] if len(node.args) > index else node.kwargs.get("training", node.kwargs.get("train"))
            if current != mode:
                _set_arg(node, index, "train", mode)
                changed = True
        elif node.target in _ATTENTION:
            train_p = node.meta.setdefault(_TRAIN_P, _sdpa_dropout(node))
            wanted = train_p if mode else 0.0
            if _sdpa_dropout(node) != wanted:
                _set_arg(node, _SDPA_DROPOUT_ARG, "dropout_p", wanted)
                changed = True
    if changed:
        gm.recompile()



@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool):
    """`module` in train (or eval) mode for the block, then back in the mode it was in (yielded)."""
    was_training = module.training
    module.train(training)
    try:
        yield was_training
    finally:
        module.train(was_training)
