"""Adapter slots: a graph's adapter tensors as named inputs, so one base model serves many adapters.

A slot is a tensor an adapter replaces: each LoRA branch's A `[rank, in]` and B `[out, rank]` (B carries
the branch's scale, so the graph computes `B(A x)` with no multiplier), a trained head that PEFT saves
in full (`modules_to_save`), and a prompt table. Slot names are the tensors' names in the graph (PEFT's
module paths), so an adapter file matches by construction. LoRA slots default to rank 0 (no adapter);
the others default to the graph's current values.

`slotted` copies a graph with every slot read from a new input; `per_row` makes every slot per-row
instead: the slot holds N stacked adapters `[N, ...]` (ranks zero-padded to the largest) and an
`adapter_index` input picks one per row, so one call serves rows of different adapters. Both are plain
graph rewrites: the results run in PyTorch and export to ONNX.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from rewrite.errors import RewriteError
from rewrite.inputs import example_inputs
from rewrite.ir import info, tag, tensor_at

aten = torch.ops.aten
INDEX = "adapter_index"
PROMPT_TABLE = "prompt_encoder.embedding.weight"
DEFAULT_MAX_RANK = 64
RANK = None  # a slot shape's dynamic rank axis


@dataclass(frozen=True)
class Slot:
    """One named adapter tensor: its shape (None marks the rank axis), dtype and kind (lora_A, lora_B, tensor)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    kind: str

    def fits(self, shape: tuple[int, ...], max_rank: int) -> str | None:
        """Why a tensor of `shape` cannot fill this slot, or None when it can."""
        if len(shape) != len(self.shape) or any(want is not None and want != got for want, got in zip(self.shape, shape)):
            wanted = "x".join("rank" if d is None else str(d) for d in self.shape)
            return f"has shape {tuple(shape)} but the model's slot is [{wanted}]"
        rank = self.rank(shape)
        if rank is not None and rank > max_rank:
            return f"has rank {rank}, above the model's slot limit of {max_rank}"
        return None

    def rank(self, shape: tuple[int, ...]) -> int | None:
        return next((got for want, got in zip(self.shape, shape) if want is None), None)

    def to_json(self) -> dict:
        return asdict(self)


def _lora_adds(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The first `W0 x + scale * B(A x)` join of each LoRA branch, by module path."""
    adds: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if tag(node).get("lora_add"):
            adds.setdefault(tag(node)["target"], node)
    return adds


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def slots(gm: fx.GraphModule) -> list[Slot]:
    """The graph's adapter slots: LoRA A/B of every branch, the prompt table, and every other trainable tensor."""
    found: list[Slot] = []
    for path in _lora_adds(gm):
        a, b = tensor_at(gm, f"{path}.lora_A.weight"), tensor_at(gm, f"{path}.lora_B.weight")
        found.append(Slot(f"{path}.lora_A.weight", (RANK, a.shape[1]), _dtype_name(a), "lora_A"))
        found.append(Slot(f"{path}.lora_B.weight", (b.shape[0], RANK), _dtype_name(b), "lora_B"))
    names = {s.name for s in found}
    others = [n for n in info(gm).get("trainable", []) if n not in names and not n.startswith("prompt_encoder.")]
    if _has_attr(gm, PROMPT_TABLE):
        others.insert(0, PROMPT_TABLE)
    for name in others:
        value = tensor_at(gm, name)
        found.append(Slot(name, tuple(value.shape), _dtype_name(value), "tensor"))
    if not found:
        raise RewriteError("the graph has no adapter (no LoRA branch, prompt table or trained head) to make slots for; "
                           "apply the lora, prompt or ptuning pass first")
    return found


def _has_attr(gm: fx.GraphModule, name: str) -> bool:
    return any(n.target == name for n in gm.graph.find_nodes(op="get_attr"))


def values(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """What fills the slots for this graph's adapter: its tensors, with each branch's scale folded into B."""
    gm = _fold_prompt_encoders(gm)
    adds = _lora_adds(gm)
    result = {}
    for slot in slots(gm):
        value = tensor_at(gm, slot.name).detach()
        if slot.kind == "lora_B":
            value = value * tag(adds[slot.name.removesuffix(".lora_B.weight")])["scale"]
        result[slot.name] = value.contiguous().cpu()
    return result


def defaults(gm: fx.GraphModule, slot_list: list[Slot], rank: int = 0) -> dict[str, torch.Tensor]:
    """No adapter: LoRA slots zero at `rank` (0: no branch at all), the others at the graph's current values."""
    result = {}
    for slot in slot_list:
        if slot.kind == "tensor":
            result[slot.name] = tensor_at(gm, slot.name).detach().contiguous().cpu()
        else:
            shape = [rank if d is None else d for d in slot.shape]
            result[slot.name] = torch.zeros(shape, dtype=getattr(torch, slot.dtype))
    return result


def fingerprint(gm: fx.GraphModule, slot_list: list[Slot]) -> int:
    """A 31-bit digest of the base weights (every tensor that is not a slot): adapter files carry it as their
    model version, so an adapter made for another base model is refused."""
    skip = {s.name for s in slot_list}
    digest = hashlib.blake2b(digest_size=4)
    for name, tensor in sorted(gm.state_dict().items()):
        if name not in skip and ".lora_" not in name and not name.startswith("prompt_encoder."):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def _fold_prompt_encoders(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose prompt encoder (if any) is its constant table: the table is what an adapter replaces."""
    from rewrite.passes.fold import fold_prompt_encoders

    if not any(tag(n).get("prompt_table") for n in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    fold_prompt_encoders(gm)
    gm.recompile()
    return gm


def _unscale(gm: fx.GraphModule) -> None:
    """B's slot carries the scale: every branch's `* scale` node goes."""
    for add in [n for n in gm.graph.nodes if tag(n).get("lora_add")]:
        node = add.args[1]
        while node.target is not aten.mul.Tensor:
            node = node.args[0]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


def _add_inputs(gm: fx.GraphModule, names: list[str]) -> dict[str, fx.Node]:
    """New graph inputs after the existing ones; the pytree signature learns them as keyword arguments."""
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    created = {}
    with gm.graph.inserting_after(last):
        for name in reversed(names):
            created[name] = gm.graph.placeholder(python_name(name))
    codegen = gm.graph._codegen
    all_names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    spec = pytree.tree_flatten(((), {n: None for n in all_names}))[1]
    codegen.pytree_info = codegen.pytree_info._replace(orig_args=all_names, in_spec=spec)
    return {name: created[name] for name in names}


def python_name(name: str) -> str:
    """The keyword a slot's input has in the graph's Python signature (ONNX gets the real name back)."""
    return name if name == INDEX else "slot__" + name.replace(".", "__")


def _prepared(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Slot]]:
    """A copy with prompt encoders folded and LoRA scales dropped (B's slot carries them)."""
    gm = copy.deepcopy(_fold_prompt_encoders(gm))
    slot_list = slots(gm)
    _unscale(gm)
    return gm, slot_list


def _replace_reads(gm: fx.GraphModule, name: str, new: fx.Node) -> None:
    for node in list(gm.graph.find_nodes(op="get_attr", target=name)):
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def slotted(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Slot]]:
    """A copy of `gm` that reads every slot from an input named `python_name(slot)`."""
    gm, slot_list = _prepared(gm)
    inputs = _add_inputs(gm, [s.name for s in slot_list])
    for slot in slot_list:
        _replace_reads(gm, slot.name, inputs[slot.name])
    return _finish(gm), slot_list


def _record_shapes(gm: fx.GraphModule) -> None:
    """Runs a two-token example through the graph so every node knows its shape (archives keep none)."""
    names = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    device = next(iter(gm.parameters())).device
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs(names, vocab_size=2, device=device).values())


def _ndim(node: fx.Node) -> int:
    return len(node.meta["tensor_meta"].shape)


def _per_row_linear(gm: fx.GraphModule, linear: fx.Node, rows: dict[str, fx.Node]) -> None:
    """`linear(x, W, b)` with W (and b) gathered per row: `[B, in, out]` weights, one matmul per row."""
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
        x3 = graph.call_function(aten.unsqueeze.default, (x, 1)) if ndim == 2 else x
        y = graph.call_function(aten.matmul.default, (x3, w))
        if ndim == 2:
            y = graph.call_function(aten.squeeze.dim, (y, 1))
        if bias is not None:
            b = fetch(bias)
            if b is not None and ndim == 3:
                b = graph.call_function(aten.unsqueeze.default, (b, 1))
            y = graph.call_function(aten.add.Tensor, (y, b if b is not None else bias))
    y.meta["tensor_meta"] = linear.meta["tensor_meta"]  # the replacement computes the same shape
    linear.replace_all_uses_with(y)
    graph.erase_node(linear)


def per_row(gm: fx.GraphModule, stacked: dict[str, fx.Node], index: fx.Node) -> None:
    """Every read of a slot becomes the rows `stacked[slot][adapter_index]`; linears over them run per row."""
    graph = gm.graph
    rows = {}
    with graph.inserting_after(index):
        for name, source in stacked.items():
            rows[name] = graph.call_function(aten.index_select.default, (source, 0, index))
    for name in stacked:
        for read in list(graph.find_nodes(op="get_attr", target=name)):
            for user in list(read.users):
                if user.target is not aten.linear.default:
                    raise RewriteError(f"slot {name} is read by {user.target}, not a linear layer; per-row adapters "
                                       "cover LoRA branches and linear heads (prompt tables serve one adapter at a time)")
                _per_row_linear(gm, user, rows)
            graph.erase_node(read)


def stack(slot_list: list[Slot], adapters: list[dict[str, torch.Tensor]], fallback: dict[str, torch.Tensor],
          ) -> dict[str, torch.Tensor]:
    """The stacked slot inputs `[N, ...]` for `adapters` (each slot's ranks zero-padded to the largest; a slot
    an adapter lacks takes `fallback`'s value), keyed by slot name."""
    stacked = {}
    for slot in slot_list:
        rows = [a.get(slot.name, fallback[slot.name]) for a in adapters]
        if slot.kind != "tensor":
            axis = slot.shape.index(RANK)
            rank = max(r.shape[axis] for r in rows)
            rows = [torch.nn.functional.pad(r, [0, rank - r.shape[axis]] if axis == 1 else [0, 0, 0, rank - r.shape[axis]])
                    for r in rows]
        stacked[slot.name] = torch.stack(rows)
    return stacked


def mixed(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Slot]]:
    """A copy of `gm` whose slots are stacked inputs `[N, ...]` and whose rows pick one by `adapter_index`."""
    gm, slot_list = _prepared(gm)
    if any(s.name == PROMPT_TABLE for s in slot_list):
        raise RewriteError("per-row adapters cover LoRA branches and linear heads; a prompt table serves one adapter "
                           "at a time (export with --adapter-slots instead)")
    _record_shapes(gm)
    inputs = _add_inputs(gm, [s.name for s in slot_list] + [INDEX])
    index = inputs.pop(INDEX)
    per_row(gm, inputs, index)
    return _finish(gm), slot_list
