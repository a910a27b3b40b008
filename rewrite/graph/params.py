"""Which parameters train, PEFT's trainable-parameter line, and the check that weights are finite."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.graph.query import GraphQuery
from rewrite.graph.ir import info


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor that holds NaN or infinity, or None (meta tensors hold
    no values): a model computed from such weights gives NaN, so capture, fold and export refuse them."""
    return next((name for name, tensor in tensors if tensor.is_floating_point() and tensor.device.type != "meta"
                 and not torch.isfinite(tensor).all()), None)


def _parameter(gm: fx.GraphModule, name: str) -> nn.Parameter | None:
    """The parameter called `name`, or None once a pass has removed it (fold drops LoRA's)."""
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return None


def canonical_names(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """Each parameter under the name `named_parameters()` lists it by: a tied tensor (BERT's MLM decoder
    is the word embedding) has several names, and must be listed, and trained, once."""
    first: dict[int, str] = {}
    for name, param in gm.named_parameters():
        first.setdefault(id(param), name)
    return list(dict.fromkeys(first.get(id(_parameter(gm, n)), n) for n in names))


def mark_trainable(gm: fx.GraphModule, names: list[str]) -> None:
    """Adds `names` to the graph's trainable set and freezes every other parameter (PEFT freezes the base)."""
    trainable = info(gm).trainable
    trainable.extend(n for n in canonical_names(gm, names) if n not in trainable)
    apply_trainable(gm)


def forget_trainable(gm: fx.GraphModule, names: list[str]) -> None:
    gone = set(canonical_names(gm, names))
    info(gm).trainable = [n for n in info(gm).trainable if n not in gone]


def apply_trainable(gm: fx.GraphModule) -> None:
    """`requires_grad` follows the trainable set, matched by tensor, so every name of a tied tensor agrees."""
    trainable = {id(p) for p in (_parameter(gm, n) for n in info(gm).trainable) if p is not None}
    for param in gm.parameters():
        param.requires_grad_(id(param) in trainable)


def count_parameters(gm: fx.GraphModule) -> tuple[int, int]:
    """(trainable, all) parameter counts, shared tensors counted once. Trainable is what `train` would
    optimize (the passes' trainable set), so a base capture counts 0."""
    chosen = {id(p) for p in (_parameter(gm, n) for n in info(gm).trainable) if p is not None}
    trainable = total = 0
    for param in gm.parameters():
        total += param.numel()
        if id(param) in chosen:
            trainable += param.numel()
    return trainable, total


def trainable_parameters_line(gm: fx.GraphModule) -> str:
    trainable, total = count_parameters(gm)
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(gm: fx.GraphModule) -> None:
    """Prints PEFT's exact line: `trainable params: 73,728 || all params: ... || trainable%: 0.3231`."""
    print(trainable_parameters_line(gm))


def saved_heads(gm: fx.GraphModule) -> list[str]:
    """The modules a sequence classifier trains whole by default, as PEFT's SEQ_CLS matches them (none for other
    tasks); a head whose weights are all another module's (an MLM decoder tied to the word embeddings) is not one."""
    if info(gm).task != "seq-cls":
        return []
    names = [name for name, _ in gm.named_parameters()]
    return _peft_suffix_matches([m for m in GraphQuery(gm).head_modules if _holds_parameters(m, names)], names)


def trainable_heads(gm: fx.GraphModule, requested: list[str] | None) -> list[str]:
    """Parameter names of the modules that train beside the adapter: PEFT's SEQ_CLS also trains its fresh head,
    the whole head module (`classifier`, `score`) with everything inside it."""
    names = [name for name, _ in gm.named_parameters()]
    modules = list(requested) if requested is not None else saved_heads(gm)
    missing = [m for m in modules if not _holds_parameters(m, names)]
    if missing:
        raise RewriteError(f"modules_to_save {', '.join(missing)} name no module with parameters in this graph")
    info(gm).modules_to_save = sorted(set(info(gm).modules_to_save or []) | set(modules)) or None
    return [n for n, _ in gm.named_parameters() if any(n.startswith(m + ".") for m in modules)]


def _holds_parameters(module: str, names: list[str]) -> bool:
    return any(name.startswith(module + ".") for name in names)


def _peft_suffix_matches(heads: list[str], names: list[str]) -> list[str]:
    """The heads plus every module whose path ends with a head's, as PEFT matches `modules_to_save`
    (`endswith`, no dot: DistilBERT's `pre_classifier` trains beside `classifier` in PEFT too)."""
    modules = {name.rsplit(".", i)[0] for name in names for i in range(1, name.count(".") + 1)}
    return sorted(m for m in modules if any(m.endswith(head) for head in heads))
