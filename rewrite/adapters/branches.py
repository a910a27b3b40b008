"""Branch sites: where an adapter method changed a base computation, as a typed record instead of tag strings.

A method builds its nodes with `builder(gm, at, method, path)` and marks the node that now stands for the
base value with `mark_output` (`output = f(base, ...)`, `base` its first argument): LoRA's `y + s·BAx`,
IA3's `y * l` or `x * l`. `sites` reads them back; `fold` merges each site's tensors into its base weights
with the method's own merge, restores the base value, and erases the branch. The tags are this module's
business; methods, speed passes and the slot export use the records. The low-rank down projection (`x @ A.T`)
is marked too (`mark_down`), so speed passes find it without knowing a method or tensor name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from rewrite.errors import RewriteError
from rewrite.graph.ir import remove_tensor, tag, tensor_at
from rewrite.graph.nodes import NodeBuilder
from rewrite.graph.params import forget_trainable, non_finite
from rewrite.graph.transaction import overwrite

_OUTPUT = "branch_output"
_LEGACY_OUTPUT = "lora_add"  # archives written before branch sites had their own tag
_DOWN = "branch_down"


@dataclass(frozen=True)
class BranchSite:
    """One adapted call of a base module: the method (pass name) and module path, the base weight it may merge
    into (`transposed`: stored `[in, out]`, GPT-2's Conv1D), the branch multiplier, the output node, and what
    the method recorded about the branch (LoRA: its rank and alpha; empty in archives from before records)."""

    method: str
    path: str
    weight: str
    transposed: bool
    scale: float
    output: fx.Node
    record: dict

    @property
    def base(self) -> fx.Node:
        """The base value the branch's output stands for (what a fold restores)."""
        return self.output.args[0]


def builder(gm: fx.GraphModule, at: fx.Node, method: str, path: str, **options) -> NodeBuilder:
    """A node builder whose nodes belong to the branch of `method` at `path` (what `fold` erases)."""
    return NodeBuilder(gm.graph, at, **{"pass": method, "target": path}, **options)


def mark_output(output: fx.Node, weight: str, transposed: bool, scale: float, **record) -> None:
    """Marks `output` (built by `builder`, first argument the base value) as its branch's output; `record` holds
    JSON values the method reads back from `BranchSite.record`."""
    output.meta["rewrite"].update({_OUTPUT: True, "weight": weight, "transposed": transposed, "scale": scale,
                                   "record": record})


def mark_down(node: fx.Node) -> None:
    """Marks a low-rank down projection `linear(x, A)`: speed passes fuse and recompute these."""
    node.meta["rewrite"][_DOWN] = True


def is_down(node: fx.Node) -> bool:
    return bool(tag(node).get(_DOWN))


def _site(node: fx.Node) -> BranchSite | None:
    marks = tag(node)
    if not (marks.get(_OUTPUT) or marks.get(_LEGACY_OUTPUT)):
        return None
    return BranchSite(marks["pass"], marks["target"], marks["weight"], marks["transposed"], marks["scale"], node,
                      dict(marks.get("record") or {}))


def sites(gm: fx.GraphModule, method: str | None = None) -> list[BranchSite]:
    """Every branch output in graph order (a module called twice has two), of `method` or of every method."""
    found = [site for node in gm.graph.nodes if (site := _site(node)) is not None]
    return [site for site in found if method is None or site.method == method]


def by_path(found: list[BranchSite]) -> dict[str, BranchSite]:
    """The first site of each adapted module."""
    first: dict[str, BranchSite] = {}
    for site in found:
        first.setdefault(site.path, site)
    return first


def _erase(gm: fx.GraphModule, found: list[BranchSite]) -> None:
    paths = {(site.method, site.path) for site in found}
    for site in found:
        site.output.replace_all_uses_with(site.base)
    for node in reversed(list(gm.graph.nodes)):
        if (tag(node).get("pass"), tag(node).get("target")) in paths and not node.users:
            gm.graph.erase_node(node)


Merge = Callable[[fx.GraphModule, BranchSite], dict[str, torch.Tensor]]


def fold(gm: fx.GraphModule, method: str, merge: Merge, tensors: Callable[[str], list[str]]) -> list[str]:
    """Merges every branch of `method` into the base: `merge(gm, site)` gives the new values of the base tensors
    (computed in fp32 by the method; cast back here), all checked before any is written; then each branch is
    erased and its tensors (`tensors(path)`) removed. Returns the module paths folded."""
    first = by_path(sites(gm, method))
    merged = {}
    for path, site in first.items():
        for name, value in merge(gm, site).items():
            if non_finite([(name, value)]):
                raise RewriteError(f"folding the branch of {path} gives non-finite weights; the adapter is corrupt")
            merged[name] = value.to(tensor_at(gm, name).dtype)
    for name, value in merged.items():
        overwrite(tensor_at(gm, name), value)
    _erase(gm, sites(gm, method))
    names = [name for path in first for name in tensors(path)]
    for name in names:
        remove_tensor(gm, name)
    forget_trainable(gm, names)
    return list(first)
