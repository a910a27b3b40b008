"""The transformer blocks of a captured graph, and the graph outlined into one module per block.

A captured graph is one flat forward over a module tree that only holds tensors. Per-block work
needs the blocks back: activation checkpointing outlines each block's stretch of nodes into a
sub-graph (the checkpoint pass), and FSDP needs each block to be a module the graph calls, since its
hooks gather a unit's parameters when that unit is called. A block is a numbered module path
(`model.layers.3`, `transformer.h.0`); its nodes are the calls made inside it, which run as one
contiguous stretch of the graph, with the root-level calls between them (shape arithmetic).

`outline_blocks` replaces each block's module by a GraphModule running its stretch, at the same path
and holding the same tensor objects, so every parameter keeps its name and has one owner, and LoRA's
(or another adapter's) tensors under a block path go with it. It refuses, changing nothing, when a
block's stretch is interleaved with another's, a block's tensor is read outside it, or a tensor is
tied across a block boundary: the caller then treats the graph as one unit. The graph as it was
stays in `BlockLayout.flat`, for an eval twin and for saving (the archive stores ATen graphs only).

The modules outside the blocks that own tensors only their own calls read, in one stretch (the input
embeddings, the final norm, an untied LM head), are outlined the same way as edge units: FSDP then gathers
a 32k-vocabulary embedding or head, bigger than a block, only while it runs, not for the whole step.
A module that fails a test (a tensor tied to another module, calls interleaved) stays in the root.

Inside each block, each projection (its weight and the adapter tensors under it: LoRA's A and B) is outlined the
same way into a part of the block, for FSDP a unit nested in the block's: FSDP gathers a unit into a buffer and then
copies it out, so a unit costs twice its size while it is gathered; a block's largest projection is a third of it
(LLaMA's MLP) or less. A projection whose calls interleave with another's, or whose tensors are read elsewhere in
the block, stays in the block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from rewrite.graph.ir import RewriteGraph, deep_copy, info, owner_of, wrap
from rewrite.graph.outline import outline_module
from rewrite.graph.query import GraphQuery, block_of, module_path


@dataclass
class Block:
    """One block's stretch: its calls and the unnumbered ones between them, in graph order, and the calls of
    other blocks that interleave with it (a block with any cannot be outlined)."""

    path: str
    stretch: list[fx.Node]
    interleaved: list[fx.Node]


def _label(node: fx.Node) -> str | None:
    return block_of(module_path(node) or "") if node.op == "call_function" else None


def find_blocks(graph: fx.Graph) -> list[Block]:
    """Every block with calls in `graph`, in the order its first call runs."""
    nodes = list(graph.nodes)
    spans: dict[str, list[int]] = {}
    for position, node in enumerate(nodes):
        path = _label(node)
        if path is not None:
            spans.setdefault(path, [position, position])[1] = position
    found = []
    for path, (first, last) in spans.items():
        stretch = [n for n in nodes[first:last + 1] if n.op == "call_function"]
        found.append(Block(path, stretch, [n for n in stretch if _label(n) not in (None, path)]))
    return found


class Refused(Exception):
    """The graph cannot be outlined per block; the message says why."""


def plan_blocks(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Each block's nodes to outline, in graph order: the get_attrs of tensors under its path, then its stretch;
    then each edge unit's the same way. Raises `Refused` when a block is interleaved, a block's tensor is read outside it, or a tensor is tied
    across a block boundary."""
    blocks = find_blocks(gm.graph)
    if not blocks:
        raise Refused("the graph has no numbered blocks (module paths like model.layers.0)")
    for block in blocks:
        if block.interleaved:
            raise Refused(f"block {block.path} is interleaved with {_label(block.interleaved[0])} "
                          f"(node {block.interleaved[0].name})")
    _check_ties(gm)
    stretches = {block.path: set(block.stretch) for block in blocks}
    owned: dict[str, list[fx.Node]] = {block.path: [] for block in blocks}
    for node in gm.graph.find_nodes(op="get_attr"):
        path = block_of(node.target)
        if path is None or not node.users:
            continue
        readers = {_reader(user, stretches) for user in node.users}
        if readers - {path}:
            raise Refused(f"tensor {node.target} is read outside its block {path} "
                          f"(by {', '.join(sorted(r or 'the root' for r in readers - {path}))})")
        owned[path].append(node)
    plan = {block.path: owned[block.path] + block.stretch for block in blocks}
    return plan | _edge_units(gm, {n for nodes in plan.values() for n in nodes})


def _edge_units(gm: fx.GraphModule, taken: set[fx.Node]) -> dict[str, list[fx.Node]]:
    """The modules outside the blocks that can be outlined as units of their own (the module docstring):
    each tensor goes with the one module path all its readers share, when the tensor lies under it; a module
    with parameters among them becomes a unit."""
    attrs = list(gm.graph.find_nodes(op="get_attr"))
    owned: dict[str, list[fx.Node]] = {}
    for node in attrs:
        paths = {module_path(user) for user in node.users}
        path = paths.pop() if len(paths) == 1 else None
        if node not in taken and path and node.target.startswith(path + "."):
            owned.setdefault(path, []).append(node)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    call_paths = [module_path(n) or "" for n in calls]
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    parameters = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    units = {}
    for path, mine in owned.items():
        if not parameters & {n.target for n in mine}:
            continue  # buffers only (rotary frequencies): nothing to shard
        inside = [i for i, called in enumerate(call_paths) if _under(called, path)]
        stretch = calls[inside[0]:inside[-1] + 1]
        read_elsewhere = {n.target for n in attrs if n.users and n not in mine}
        if len(stretch) == len(inside) and not taken & set(stretch) and _owns_alone(named, path, read_elsewhere):
            units[path] = mine + stretch
    nested = {p for p in units for q in units if p != q and p.startswith(q + ".")}
    return {path: nodes for path, nodes in units.items() if path not in nested}


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _owns_alone(named: list[tuple[str, torch.Tensor]], path: str, read_elsewhere: set[str]) -> bool:
    """Every tensor under `path` is read there or nowhere, and none is also registered outside it."""
    under = {id(t) for name, t in named if name.startswith(path + ".")}
    return not any(name in read_elsewhere or not name.startswith(path + ".") for name, t in named if id(t) in under)


def _reader(user: fx.Node, stretches: dict[str, set[fx.Node]]) -> str | None:
    return next((path for path, nodes in stretches.items() if user in nodes), None)


def _check_ties(gm: fx.GraphModule) -> None:
    """Refuses a tensor registered under names in different blocks (or in a block and at the root)."""
    places: dict[int, dict[str, str | None]] = {}
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        places.setdefault(id(tensor), {})[name] = block_of(name)
    for names in places.values():
        if len(set(names.values())) > 1:
            raise Refused(f"tensors {', '.join(sorted(names))} are one tensor tied across a block boundary")


@dataclass
class BlockLayout:
    """What `outline_blocks` did: the outlined block paths and edge units (none when refused, with the
    reason) and the graph as it was, which still runs over the outlined module tree."""

    flat: fx.Graph
    paths: list[str] = field(default_factory=list)
    edges: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # the projections outlined inside the blocks
    refused: str | None = None
    vocabulary: list[str] = field(default_factory=list)  # edge units whose rows FSDP leaves to each rank
    packed: list[str] = field(default_factory=list)  # packed weights (buffers) FSDP shards as frozen parameters

    @property
    def units(self) -> list[str]:
        """Every outlined module but the vocabulary-parallel ones, the parts of blocks before the blocks (FSDP shards
        an inner unit before the unit around it), then the edge units: FSDP's units below the root."""
        return [*self.parts, *self.paths, *(path for path in self.edges if path not in self.vocabulary)]

    def gathered_twin(self, gm: fx.GraphModule, full: dict[str, torch.Tensor]) -> RewriteGraph:
        """The flat graph in eval mode over the tensors `full` names (a sharded `gm`'s parameters gathered whole
        on rank 0: what is written after training), sharing their storage, with
        `gm`'s buffers (the packed weights buffers again), tied names and trainable flags."""
        root, made = nn.Module(), {}
        for name, tensor in gm.named_parameters(remove_duplicate=False):
            module, leaf = owner_of(root, name)
            if name in self.packed:
                module.register_buffer(leaf, full[name])
                continue
            if id(tensor) not in made:
                made[id(tensor)] = nn.Parameter(full[name], requires_grad=tensor.requires_grad)
            module.register_parameter(leaf, made[id(tensor)])
        for name, tensor in gm.named_buffers(remove_duplicate=False):
            module, leaf = owner_of(root, name)
            module.register_buffer(leaf, tensor)
        return wrap(root, deep_copy(self.flat), info(gm), training=False)


def outline_blocks(gm: fx.GraphModule, checkpointed: bool = False, flat: fx.Graph | None = None) -> BlockLayout:
    """Outlines `gm` in place, one GraphModule per block at the block's own path (the module docstring
    says what is kept); when refused, `gm` is left as it was. `checkpointed` blocks recompute their
    activations in the backward (activation checkpointing per block). Switch modes before, not after,
    sharding: the block graphs follow `gm.train()` / `gm.eval()`. `flat`: the graph the layout keeps as `gm`'s
    flat form (default: `gm`'s own, copied), e.g. the graph before training-speed passes rewrote it."""
    flat = deep_copy(gm.graph) if flat is None else flat
    try:
        plan = plan_blocks(gm)
    except Refused as refusal:
        return BlockLayout(flat, refused=str(refusal))
    for path, nodes in plan.items():
        outline_module(gm, path, nodes, checkpointed and block_of(path) is not None)
    gm.graph.lint()
    gm.recompile()
    paths = [p for p in plan if block_of(p) is not None]
    parts = [f"{path}.{part}" for path in paths for part in outline_parts(gm.get_submodule(path), path)]
    return BlockLayout(flat, paths, [p for p in plan if block_of(p) is None], parts)


def outline_parts(block: fx.GraphModule, path: str) -> list[str]:
    """Outlines each projection of block `path` that can be (the module docstring) into a part of the block, in
    place; their paths inside the block."""
    plan = _plan_parts(block, path)
    for part, nodes in plan.items():
        outline_module(block, part, nodes)
    block.graph.lint()
    block.recompile()
    return list(plan)


def _plan_parts(block: fx.GraphModule, path: str) -> dict[str, list[fx.Node]]:
    """Each outlinable projection module's nodes (its get_attrs, then its stretch of calls), by its path inside
    the block: the modules holding a projection's weight, not inside another one (LoRA's A and B are inside theirs)."""
    holders = {p.weight.rpartition(".")[0] for p in GraphQuery(block).projections}
    holders = sorted(h for h in holders if h and not any(h.startswith(o + ".") for o in holders))
    calls = [n for n in block.graph.nodes if n.op == "call_function"]
    owner = [next((h for h in holders if _under(module_path(n) or "", f"{path}.{h}")), None) for n in calls]
    attrs = list(block.graph.find_nodes(op="get_attr"))
    named = [*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)]
    plan = {}
    for holder in holders:
        inside = [i for i, o in enumerate(owner) if o == holder]
        if not inside or set(owner[inside[0]:inside[-1] + 1]) - {holder, None}:
            continue  # no calls, or another projection's interleaved
        stretch = calls[inside[0]:inside[-1] + 1]
        mine = [n for n in attrs if n.target.startswith(holder + ".")]
        read_elsewhere = {n.target for n in attrs if n.users and n not in mine}
        if set().union(*(n.users for n in mine)) <= set(stretch) and _owns_alone(named, holder, read_elsewhere):
            plan[holder] = mine + stretch
    return plan
