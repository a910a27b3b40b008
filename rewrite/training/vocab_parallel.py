"""Vocabulary-parallel word embedding and LM head under FSDP: each rank keeps its rows of the table, never the whole.

FSDP gathers a unit whole while it runs, into a buffer it then copies out: for a 32k-word table (bigger than a
transformer block) that is twice the table on every rank. A frozen, untied table needs no gathering: each rank
keeps rows `[start, stop)` (DTensor's `Shard(0)` split, so `full_tensor` and the state-dict utilities still see the
whole table) and the ranks exchange activations instead, which are small at training batch sizes. Every rank holds
different tokens (data parallel), so:

- the lookup gathers every rank's ids, looks up those in its own rows (zeros elsewhere) and reduce-scatters the sum,
  each rank getting its own tokens' rows; the table is frozen and ids carry no gradient, so there is no backward;
- the head gathers every rank's hidden states, computes the logits of its own rows for all of them and exchanges
  them all-to-all, each rank getting its own tokens' logits over the whole vocabulary; the backward does the
  reverse and reduce-scatters `grad_logits @ rows` onto each rank's hidden states.

`shardable` finds the lookup or head of an outlined edge unit that can run so, `shard_rows` rewrites it in place.
A trainable or tied table, a head with a bias, or a lookup of quantized rows keep FSDP's gathering.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from rewrite.errors import RewriteError
from rewrite.graph.query import GraphQuery, word_embedding

aten = torch.ops.aten


def vocabulary_tables(gm: fx.GraphModule) -> set[str]:
    """The names of the word-embedding table and of the output heads onto its vocabulary (none without a word
    embedding fed by `input_ids`)."""
    try:
        lookup = word_embedding(gm, "")
    except RewriteError:
        return set()
    if lookup.target is not aten.embedding.default:
        return set()  # quantized rows
    table = lookup.args[0].target
    vocab = gm.get_parameter(table).shape[0]
    return {table, *(p.weight for p in GraphQuery(gm).output_heads if p.out_features == vocab and not p.transposed)}


def shardable(unit: fx.GraphModule, path: str, tables: set[str]) -> fx.Node | None:
    """The lookup (`aten.embedding`) or bias-free head (`aten.linear`) of edge unit `unit` at `path` that reads one of
    `tables`, the only tensor of a unit with nothing to train."""
    if any(p.requires_grad for p in unit.parameters()) or len(list(unit.parameters())) != 1:
        return None
    for node in unit.graph.find_nodes(op="get_attr"):
        if f"{path}.{node.target}" not in tables or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.target is aten.embedding.default and user.args[0] is node:
            return user
        if user.target is aten.linear.default and user.args[1] is node and len(user.args) == 2:
            return user
    return None


def shard_rows(unit: fx.GraphModule, node: fx.Node, mesh: DeviceMesh, device: torch.device,
               dtype: torch.dtype | None) -> nn.Parameter:
    """Replaces the table `node` reads by this rank's rows (a frozen DTensor parameter on `device`, under the same
    name) and `node` by its vocabulary-parallel twin computing in `dtype` (None: the table's); returns the new
    parameter, for FSDP to leave alone."""
    attr = node.args[0] if node.target is aten.embedding.default else node.args[1]
    table = unit.get_parameter(attr.target).detach()
    start, stop = _rows(table.shape[0], mesh.size(), mesh.get_local_rank())
    rows = table[start:stop].to(device, copy=True)
    shard = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=table.shape, stride=table.stride())
    unit.register_parameter(attr.target, nn.Parameter(shard, requires_grad=False))
    with unit.graph.inserting_before(node):
        if node.target is aten.embedding.default:
            twin = unit.graph.call_function(embedding, (attr, node.args[1], dtype))
        else:
            twin = unit.graph.call_function(head, (node.args[0], attr, dtype))
    twin.meta = dict(node.meta)
    node.replace_all_uses_with(twin)
    unit.graph.erase_node(node)
    unit.recompile()
    return unit.get_parameter(attr.target)


def _rows(total: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s rows as `Shard(0)` splits them: `torch.chunk`'s, the last ranks possibly with fewer or none."""
    size = -(-total // world)
    start = min(rank * size, total)
    return start, min(start + size, total)


def _local(table: DTensor) -> tuple[torch.Tensor, int, int, dist.ProcessGroup]:
    """This rank's rows, their first row's index, the rows per rank (the last ranks' padded to it) and the group."""
    mesh = table.device_mesh
    start, _ = _rows(table.shape[0], mesh.size(), mesh.get_local_rank())
    return table.to_local(), start, -(-table.shape[0] // mesh.size()), mesh.get_group()


def _gather(rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's `rows` stacked `[world, most, ...]`, zero-padded to the most rows a rank has (ranks may hold
    batches of different lengths)."""
    world = dist.get_world_size(group)
    counts = torch.empty(world, dtype=torch.int64, device=rows.device)
    dist.all_gather_single(counts, torch.tensor([rows.shape[0]], device=rows.device), group=group)
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, int(counts.max()) - rows.shape[0]))
    out = rows.new_empty((world * padded.shape[0], *rows.shape[1:]))
    dist.all_gather_single(out, padded.contiguous(), group=group)
    return out.view(world, *padded.shape)


def _scatter_sum(parts: torch.Tensor, count: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum over ranks of `parts` (`[world, most, ...]`: a part for each rank's tokens), this rank's part
    without its padding."""
    out = parts.new_empty(parts.shape[1:])
    dist.reduce_scatter_single(out, parts.flatten(0, 1).contiguous(), group=group)
    return out[:count]


def _all_to_all(parts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`parts[j]` sent to rank j; row j of the result is what rank j sent here."""
    parts = parts.contiguous()
    out = torch.empty_like(parts)
    dist.all_to_all_single(out, parts, group=group)
    return out


@torch.compiler.disable
def embedding(table: DTensor, ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`aten.embedding(table, ids)` in `dtype` over a table whose rows are spread over the ranks."""
    rows, start, _, group = _local(table)
    with torch.no_grad():
        everyone = _gather(ids.reshape(-1), group)
        inside = (everyone >= start) & (everyone < start + rows.shape[0])
        looked_up = rows.new_zeros((*everyone.shape, rows.shape[1]), dtype=dtype or rows.dtype)
        looked_up[inside] = rows[everyone[inside] - start].to(looked_up.dtype)
        return _scatter_sum(looked_up, ids.numel(), group).view(*ids.shape, rows.shape[1])


@torch.compiler.disable
def head(hidden: torch.Tensor, table: DTensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`aten.linear(hidden, table)` in `dtype` over a table whose rows are spread over the ranks."""
    rows, _, per_rank, group = _local(table)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype or hidden.dtype)
    logits = _Head.apply(flat, rows, per_rank, table.shape[0], group)
    return logits.reshape(*hidden.shape[:-1], table.shape[0])


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, rows, per_rank, vocab, group):
        everyone = _gather(hidden, group)  # [world, most, hidden]
        mine = everyone @ rows.to(hidden.dtype).T  # this rank's vocabulary columns of every rank's tokens
        swapped = _all_to_all(F.pad(mine, (0, per_rank - rows.shape[0])), group)  # [world, most, per_rank]
        ctx.save_for_backward(rows)
        ctx.shape, ctx.per_rank, ctx.group = everyone.shape, per_rank, group
        return swapped.transpose(0, 1).flatten(1)[:hidden.shape[0], :vocab]

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        world, most, _ = ctx.shape
        padded = F.pad(grad, (0, world * ctx.per_rank - grad.shape[1], 0, most - grad.shape[0]))
        back = _all_to_all(padded.view(most, world, ctx.per_rank).transpose(0, 1), ctx.group)
        rows = rows.to(grad.dtype).float()  # the rows the forward ran with, summed in fp32 as FSDP reduces
        parts = back[..., :rows.shape[0]].float() @ rows  # [world, most, hidden]
        return _scatter_sum(parts, grad.shape[0], ctx.group).to(grad.dtype), None, None, None, None
