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
from torch import fx, nn

from rewrite.errors import RewriteError
from rewrite.graph.ir import remove_tensor, tag, tensor_at
from rewrite.graph.quantized import is_quantized_module
from rewrite.graph.nodes import NodeBuilder
from rewrite.graph.params import forget_trainable, non_finite
from rewrite.graph.query import module_path
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


def retarget(gm: fx.GraphModule, path: str, weight: str) -> None:
    """The branches at `path` merge into `weight`, a float `[out, in]` weight (a quantized base made float again)."""
    for site in sites(gm):
        if site.path == path:
            site.output.meta["rewrite"].update(weight=weight, transposed=False)


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
    lossy = [path for path in first if is_quantized_module(gm, path)]
    if lossy:
        raise RewriteError(f"folding the {method} branch of {lossy[0]} would merge it into quantized weights, which "
                           f"is lossy ({len(lossy)} such modules); export the graph unfolded or with adapter slots, or fold with requantize")
    merged = []
    for path, site in first.items():
        for name, value in merge(gm, site).items():
            if non_finite([(name, value)]):
                raise RewriteError(f"folding the branch of {path} gives non-finite weights; the adapter is corrupt")
            tensor = tensor_at(gm, name)
            merged.append((path, tensor, value.to(tensor.dtype)))
    for path, tensor, value in merged:  # by tensor: an untied write renames what a later site's name means
        _write(gm, path, tensor, value)
    _erase(gm, sites(gm, method))
    names = [name for path in first for name in tensors(path)]
    for name in names:
        remove_tensor(gm, name)
    forget_trainable(gm, names)
    return list(first)


def _write(gm: fx.GraphModule, path: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Writes a merged value where the module at `path` reads `tensor`. A tensor other modules read too (a tied
    word embedding and LM head: GPT-2, Gemma, OPT, BERT's MLM decoder) is not written: the module gets its own
    copy, `<path>.weight`, and the others keep the base, so the folded graph computes what the branch did
    (PEFT's merge_and_unload writes into the shared tensor, which changes the other module too)."""
    aliases = {name for name, t in [*gm.named_parameters(remove_duplicate=False),
                                    *gm.named_buffers(remove_duplicate=False)] if t is tensor}
    uses = [(read, user) for read in gm.graph.find_nodes(op="get_attr") if read.target in aliases
            for user in read.users]
    ours = [(read, user) for read, user in uses if _inside(user, path)]
    if len(ours) == len(uses):
        overwrite(tensor, value)
        return
    own = f"{path}.weight"
    keep = next((name for name in sorted(aliases) if name != own), None)
    if keep is None:
        raise RewriteError(f"folding {path} would write into {own}, which other modules read too under the same "
                           "name; fold is refused for such a shared weight (export the graph unfolded)")
    gm.get_submodule(path).register_parameter("weight", nn.Parameter(value, requires_grad=tensor.requires_grad))
    for read, user in uses:
        target = own if (read, user) in ours else (keep if read.target == own else None)
        if target is not None:
            with gm.graph.inserting_after(read):
                user.replace_input_with(read, gm.graph.get_attr(target))


def _inside(node: fx.Node, path: str) -> bool:
    module = module_path(node) or ""
    return module == path or module.startswith(path + ".")
