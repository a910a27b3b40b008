"""Adapter slots: a graph's adapter tensors as named inputs, so one base model serves many adapters.

A slot is a tensor an adapter replaces. Each pass names its own (`Pass.adapter_slots`: LoRA its A
`[rank, in]` and B `[out, rank]`, B carrying the branch's scale; prompt tuning and P-tuning the prompt
table) and makes a copy of the graph read them directly (`Pass.prepare_slots`); every other trained
tensor (a seq-cls head PEFT saves in full) is a slot too. Slot names are the tensors' names in the graph
(PEFT's module paths), so an adapter file matches by construction. LoRA slots default to rank 0 (no
adapter); the others default to the graph's current values.

`slotted` reads every slot from a new input; `mixed` makes every slot per-row instead: the input holds N
stacked adapters `[N, ...]` (ranks zero-padded to the largest, see `stack`) and an `adapter_index` input
picks one per row, so one call serves rows of different adapters. Both are plain graph rewrites: the
results run in PyTorch and export to ONNX.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Protocol, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from rewrite.errors import RewriteError
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.graph.ir import info, tensor_at
from rewrite.graph.pipeline import capable
from rewrite.runtime import slots as runtime_slots
from rewrite.runtime.slots import INDEX, Slot, python_name

aten = torch.ops.aten


class SlotProvider(Protocol):
    """A pass whose tensors an export exposes as slots (trained tensors no pass claims become slots too)."""

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence[Any]) -> list["Slot"]:
        """The graph tensors an ONNX export exposes as named inputs that adapter files fill."""


class SlotPreparer(Protocol):
    """A pass whose slots need the exported copy rewritten first."""

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence[Any]) -> None:
        """Rewrites `gm`, a copy the slot export owns, so each slot's tensor is all its input replaces (LoRA drops
        the multiplier its B slot carries; a prompt encoder becomes its table)."""


class SlotValues(Protocol):
    """A PEFT reader whose adapters fill slots: a PEFT adapter's tensors as slot values."""

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A PEFT adapter of one of `peft_types` as the tensors that fill this pass's slots (and its head's)."""


DEFAULT_MAX_RANK = 64


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def tensor_slot(gm: fx.GraphModule, name: str) -> Slot:
    """A fixed-shape slot for the graph tensor `name` (a head, a prompt table)."""
    value = tensor_at(gm, name)
    return Slot(name, tuple(value.shape), dtype_name(value))


def prepared(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Slot]]:
    """A copy in which every pass has made its slots directly replaceable, and the slots: each pass's, then
    every other trained tensor (a seq-cls head PEFT saves in full)."""
    gm = copy.deepcopy(gm)
    found: list[Slot] = []
    for cls, runs in capable(gm, SlotPreparer):
        cls.prepare_slots(gm, runs)
    for cls, runs in capable(gm, SlotProvider):
        found.extend(cls.adapter_slots(gm, runs))
    claimed = {s.name for s in found}
    found.extend(tensor_slot(gm, name) for name in info(gm).trainable if name not in claimed)
    if not found:
        raise RewriteError("the graph has no adapter parameters (LoRA branches, a prompt table or a trained head) to "
                           "expose as slots; adapter slots need a graph with an unfolded adapter (apply lora, prompt "
                           "or ptuning first)")
    return gm, found


def values(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """What fills the slots for this graph's adapter: its tensors, each times the scale its slot carries."""
    gm, slot_list = prepared(gm)
    return {s.name: (tensor_at(gm, s.name).detach() * s.scale).contiguous().cpu() for s in slot_list}


def defaults(gm: fx.GraphModule, slot_list: list[Slot], rank: int = 0) -> dict[str, torch.Tensor]:
    """No adapter: each slot's `empty` value (a rank axis at `rank`; 0: no branch at all), current values read
    from `gm`, a prepared copy."""
    result = {}
    for slot in slot_list:
        shape = [rank if d is None else d for d in slot.shape]
        if slot.empty in ("zeros", "ones"):
            result[slot.name] = getattr(torch, slot.empty)(shape, dtype=getattr(torch, slot.dtype))
        else:
            source = slot.name if slot.empty == "current" else slot.empty
            result[slot.name] = tensor_at(gm, source).detach().contiguous().cpu()
    return result


def fingerprint(gm: fx.GraphModule, slot_list: list[Slot]) -> int:
    """A 31-bit digest of the base weights of a prepared copy (every tensor that neither is a slot nor trains):
    adapter files carry it as their model version, so an adapter made for another base model is refused."""
    skip = {s.name for s in slot_list} | set(info(gm).trainable)
    digest = hashlib.blake2b(digest_size=4)
    for name, tensor in sorted(gm.state_dict().items()):
        if name not in skip:
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def _add_inputs(gm: fx.GraphModule, names: list[str]) -> dict[str, fx.Node]:
    """New graph inputs after the existing ones; the pytree signature learns them as keyword arguments after
    the existing ones (whose structure, such as a cache's tuple, stays)."""
    existing = list(gm.graph.find_nodes(op="placeholder"))
    created = {}
    with gm.graph.inserting_after(existing[-1]):
        for name in reversed(names):
            created[name] = gm.graph.placeholder(python_name(name))
    tree = gm.graph._codegen.pytree_info
    args, kwargs = pytree.tree_unflatten([n.target for n in existing], tree.in_spec)
    added = [python_name(name) for name in names]
    spec = pytree.tree_flatten((args, {**kwargs, **{key: key for key in added}}))[1]
    gm.graph._codegen.pytree_info = tree._replace(orig_args=[*tree.orig_args, *added], in_spec=spec)
    return {name: created[name] for name in names}


def _replace_reads(gm: fx.GraphModule, name: str, new: fx.Node) -> None:
    for node in list(gm.graph.find_nodes(op="get_attr", target=name)):
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def slotted(gm: fx.GraphModule, slot_list: list[Slot]) -> fx.GraphModule:
    """`gm` (a prepared copy) reading every slot from an input named `python_name(slot)`."""
    inputs = _add_inputs(gm, [s.name for s in slot_list])
    for slot in slot_list:
        _replace_reads(gm, slot.name, inputs[slot.name])
    return _finish(gm)


def _record_shapes(gm: fx.GraphModule, example: dict | None) -> None:
    """Runs `example` (keyword inputs; default two tokens) through the graph so every node knows its shape
    (archives keep none)."""
    if example is None:
        names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
        example = example_inputs(names, vocab_size=2, device=next(iter(gm.parameters())).device)
    with torch.no_grad():
        ShapeProp(gm).propagate(*pytree.tree_leaves(example))


def _ndim(node: fx.Node) -> int:
    return len(node.meta["tensor_meta"].shape)


def _per_row_linear(gm: fx.GraphModule, linear: fx.Node, rows: dict[str, fx.Node], index: fx.Node) -> None:
    """`linear(x, W, b)` with W (and b) gathered per row: `[B, in, out]` weights, one matmul per row. A 2-D
    input holds a row's positions one after another (`[B, in]` from a head, `[B * seq, in]` from GPT-2's
    flattened Conv1D): it runs as `[B, positions, in]`."""
    graph = gm.graph
    x, weight, bias = [*linear.args, None][:3]
    ndim = _ndim(x)
    if ndim not in (2, 3):
        raise RewriteError(f"a per-row adapter needs a 2-D or 3-D input to {linear.name}, not {ndim}-D")

    def fetch(node):
        return rows[node.target] if node is not None and node.op == "get_attr" and node.target in rows else None

    with graph.inserting_before(linear):
        w = fetch(weight)
        w = graph.call_function(aten.transpose.int, (w, 1, 2)) if w is not None else \
            graph.call_function(aten.t.default, (weight,))
        if ndim == 2:
            batch = graph.call_function(aten.sym_size.int, (index, 0))
            x = graph.call_function(aten.unflatten.int, (x, 0, [batch, -1]))
        y = graph.call_function(aten.matmul.default, (x, w))
        if bias is not None:
            b = fetch(bias)
            y = graph.call_function(aten.add.Tensor, (y, bias if b is None else
                                                      graph.call_function(aten.unsqueeze.default, (b, 1))))
        if ndim == 2:
            y = graph.call_function(aten.flatten.using_ints, (y, 0, 1))
    y.meta["tensor_meta"] = linear.meta["tensor_meta"]  # the replacement computes the same shape
    linear.replace_all_uses_with(y)
    graph.erase_node(linear)


def _per_row_lookup(graph: fx.Graph, lookup: fx.Node, rows: fx.Node) -> None:
    """`embedding(table, ids)` `[B, seq]` reading each row's own table, `rows` `[B, n, width]`."""
    with graph.inserting_before(lookup):
        width = graph.call_function(aten.sym_size.int, (rows, 2))
        ids = graph.call_function(aten.unsqueeze.default, (lookup.args[1], -1))
        ids = graph.call_function(aten.expand.default, (ids, [-1, -1, width]))
        gathered = graph.call_function(aten.gather.default, (rows, 1, ids))
    if "tensor_meta" in lookup.meta:
        gathered.meta["tensor_meta"] = lookup.meta["tensor_meta"]  # a per-row linear may read it next
    lookup.replace_all_uses_with(gathered)


def _per_row_table(gm: fx.GraphModule, user: fx.Node, rows: fx.Node) -> bool:
    """A table read per row, `rows` `[B, n, hidden]`: prompt tuning's `unsqueeze(table, 0)`, broadcast over the
    batch, becomes the rows; P-tuning's lookup `embedding(table, slots)` reads each row's own table, and so does an
    embedding LoRA's `embedding(A.T, ids)` (A `[rank, vocab]`, its rows transposed). False for any other reader."""
    graph = gm.graph
    if user.target is aten.unsqueeze.default and user.args[1] == 0 and all(
            u.target is aten.expand.default for u in user.users):
        user.replace_all_uses_with(rows)
    elif user.target is aten.embedding.default and user.args[0].op == "get_attr":
        _per_row_lookup(graph, user, rows)
    elif user.target is aten.t.default and all(u.target is aten.embedding.default for u in user.users):
        with graph.inserting_before(user):
            table = graph.call_function(aten.transpose.int, (rows, 1, 2))
        for lookup in list(user.users):
            _per_row_lookup(graph, lookup, table)
            graph.erase_node(lookup)
    else:
        return False
    graph.erase_node(user)
    return True


def _per_row_scale(gm: fx.GraphModule, user: fx.Node, rows: fx.Node, index: fx.Node) -> bool:
    """An elementwise multiplier read flat, `v * view(l, [-1])` (IA3's vectors; `rows` `[B, *l.shape]`): each row's
    positions times its own vector, `[B, 1, n]` (a 2-D `v` holds a row's positions one after another, GPT-2's
    flattened Conv1D). False for any other reader."""
    graph = gm.graph
    if not (user.target is aten.view.default and list(user.args[1]) == [-1]
            and all(mul.target is aten.mul.Tensor and mul.args[1] is user for mul in user.users)):
        return False
    for mul in list(user.users):
        v, ndim = mul.args[0], _ndim(mul.args[0])
        if ndim not in (2, 3):
            raise RewriteError(f"a per-row adapter needs a 2-D or 3-D input to {mul.name}, not {ndim}-D")
        with graph.inserting_before(mul):
            batch = graph.call_function(aten.sym_size.int, (index, 0))
            vector = graph.call_function(aten.view.default, (rows, [batch, 1, -1]))
            if ndim == 2:
                v = graph.call_function(aten.unflatten.int, (v, 0, [batch, -1]))
            y = graph.call_function(aten.mul.Tensor, (v, vector))
            if ndim == 2:
                y = graph.call_function(aten.flatten.using_ints, (y, 0, 1))
        y.meta["tensor_meta"] = mul.meta["tensor_meta"]
        mul.replace_all_uses_with(y)
        graph.erase_node(mul)
    graph.erase_node(user)
    return True


def per_row(gm: fx.GraphModule, stacked: dict[str, fx.Node], index: fx.Node) -> None:
    """Every read of a slot becomes the rows `stacked[slot][adapter_index]`; linears over them run per row,
    prompt tables are read per row, scaling vectors multiply per row."""
    graph = gm.graph
    rows = {}
    with graph.inserting_after(index):
        for name, source in stacked.items():
            rows[name] = graph.call_function(aten.index_select.default, (source, 0, index))
    for name in stacked:
        for read in list(graph.find_nodes(op="get_attr", target=name)):
            for user in list(read.users):
                if user.target is aten.linear.default:
                    _per_row_linear(gm, user, rows, index)
                elif not (_per_row_table(gm, user, rows[name]) or _per_row_scale(gm, user, rows[name], index)):
                    raise RewriteError(f"slot {name} is read by {user.target}, which has no per-row form; per-row "
                                       "adapters cover linear weights (LoRA branches, heads), prompt tables and "
                                       "scaling vectors")
            graph.erase_node(read)


def stack(slot_list: list[Slot], adapters: list[dict[str, torch.Tensor]], fallback: dict[str, torch.Tensor],
          ) -> dict[str, torch.Tensor]:
    """The runtime's `stack` (`rewrite.runtime.slots`) for tensors: stacked slot inputs `[N, ...]`, ranks
    zero-padded to the largest."""
    arrays = [{name: value.numpy() for name, value in adapter.items()} for adapter in adapters]
    stacked = runtime_slots.stack(slot_list, arrays, {name: value.numpy() for name, value in fallback.items()})
    return {name: torch.from_numpy(value) for name, value in stacked.items()}


def mixed(gm: fx.GraphModule, slot_list: list[Slot], example: dict | None = None) -> fx.GraphModule:
    """`gm` (a prepared copy) with its slots as stacked inputs `[N, ...]`, each row picking one by `adapter_index`
    (`example`: keyword inputs `gm` runs on, for graphs whose inputs are not token ids and masks)."""
    refusal = next((s.no_per_row for s in slot_list if s.no_per_row), None)
    if refusal:
        raise RewriteError(refusal)
    _record_shapes(gm, example)
    inputs = _add_inputs(gm, [s.name for s in slot_list] + [INDEX])
    index = inputs.pop(INDEX)
    per_row(gm, inputs, index)
    return _finish(gm)
