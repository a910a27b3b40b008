"""Which parameters train, and PEFT's trainable-parameter line."""
from __future__ import annotations

from torch import fx

from rewrite.errors import RewriteError
from rewrite.graph import GraphQuery
from rewrite.ir import info


def mark_trainable(gm: fx.GraphModule, names: list[str]) -> None:
    """Adds `names` to the graph's trainable set and freezes every other parameter (PEFT freezes the base)."""
    trainable = info(gm).setdefault("trainable", [])
    trainable.extend(n for n in names if n not in trainable)
    apply_trainable(gm)


def forget_trainable(gm: fx.GraphModule, names: list[str]) -> None:
    gone = set(names)
    info(gm)["trainable"] = [n for n in info(gm).get("trainable", []) if n not in gone]


def apply_trainable(gm: fx.GraphModule) -> None:
    trainable = set(info(gm).get("trainable", []))
    for name, param in gm.named_parameters():
        param.requires_grad_(name in trainable)


def count_parameters(gm: fx.GraphModule) -> tuple[int, int]:
    """(trainable, all) parameter counts, shared tensors counted once."""
    trainable = total = 0
    for param in gm.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def trainable_parameters_line(gm: fx.GraphModule) -> str:
    trainable, total = count_parameters(gm)
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(gm: fx.GraphModule) -> None:
    """Prints PEFT's exact line: `trainable params: 73,728 || all params: ... || trainable%: 0.3231`."""
    print(trainable_parameters_line(gm))


def trainable_heads(gm: fx.GraphModule, requested: list[str] | None) -> list[str]:
    """Parameter names of the modules that train beside the prompt: PEFT's SEQ_CLS also trains its fresh head."""
    if requested is not None:
        modules = list(requested)
    elif info(gm).get("task") == "seq-cls":
        modules = [p.path for p in GraphQuery(gm).output_heads]
    else:
        modules = []
    known = {name.rpartition(".")[0] for name, _ in gm.named_parameters()}
    missing = [m for m in modules if m not in known]
    if missing:
        raise RewriteError(f"modules_to_save {', '.join(missing)} name no module with parameters in this graph")
    info(gm)["modules_to_save"] = sorted(set(info(gm).get("modules_to_save") or []) | set(modules)) or None
    return [n for n, _ in gm.named_parameters() if any(n.startswith(m + ".") for m in modules)]
