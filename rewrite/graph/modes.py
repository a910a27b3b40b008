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
        _recompile(gm)


def _code_owner(gm: fx.GraphModule) -> type:
    """The class that holds `gm`'s generated code: its own, or, once FSDP has sharded it, the class beneath the
    subclass FSDP puts over it (recompiling through that subclass would wrap its call twice: endless recursion)."""
    return next((c for c in type(gm).__mro__ if "_wrapped_call" in vars(c)), type(gm))


def _recompile(gm: fx.GraphModule) -> None:
    """`gm.recompile()` into `_code_owner`'s class, for `gm` and the graphs it recompiles with it."""
    graphs = {m: type(m) for m in gm.modules() if isinstance(m, fx.GraphModule)}
    for m in graphs:
        m.__class__ = _code_owner(m)
    try:
        gm.recompile()
    finally:
        for m, cls in graphs.items():
            m.__class__ = cls


_CODE = ("_code", "_lineno_map", "_prologue_start")


def _generated(module: nn.Module) -> dict[fx.GraphModule, tuple]:
    """Each graph's generated code: the source and the functions made from it."""
    return {m: (tuple(getattr(m, name, None) for name in _CODE), vars(_code_owner(m)).get("forward"),
                vars(_code_owner(m)).get("__call__")) for m in module.modules() if isinstance(m, fx.GraphModule)}


def _restore(generated: dict[fx.GraphModule, tuple]) -> None:
    """Puts back the functions of each graph whose source is again what it was."""
    for m, (state, forward, call) in generated.items():
        if m._code == state[0] and forward is not None and call is not None:
            for name, value in zip(_CODE, state):
                setattr(m, name, value)
            owner = _code_owner(m)
            owner.forward, owner.__call__ = forward, call


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool):
    """`module` in train (or eval) mode for the block, then back in the mode it was in (yielded), running the very
    functions it ran before: a `torch.compile`d caller keeps its compiled code (new code objects would be compiled
    again after every switch, and past dynamo's limit on them not at all)."""
    was_training, generated = module.training, _generated(module)
    module.train(training)
    try:
        yield was_training
    finally:
        module.train(was_training)
        _restore(generated)
