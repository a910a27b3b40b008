"""Moving a row gather up a graph: compute only the positions a head reads.

A head that reads one position per example (the `[MASK]` of a verbalizer) needs, of every node
before it that works position by position, only that row. `rows_at(...)` takes the gather as far up
as the arithmetic allows and recomputes the moved nodes on the gathered rows; their full-length
versions become dead. In a transformer this is the last block: its query projection, attention for
the one query row (keys and values still read every position), output projection, residuals, norms
and feed-forward, with any LoRA branches in them. The result is exact: the same arithmetic on fewer
rows.

A node moves when every one of its users has moved and reads it as rows, and it computes each row
of its output from that row of its row inputs alone: token-wise ops (linear, activations, norms over
the feature axis, dropout), element-wise ops over equally laid-out inputs, transposes, reshapes that
keep the axes up to the sequence axis, and non-causal scaled-dot-product attention (rows of the
query; keys, values and the mask's columns stay whole). The sequence axis of each node is read from
its traced shape (the one axis sized like the head input's sequence); nodes a pass added carry no
traced shape and inherit their input's layout.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from rewrite.graph.nodes import NodeBuilder

aten = torch.ops.aten

ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
TOKENWISE = {
    aten.linear.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.silu.default,
    aten.sigmoid.default, aten.layer_norm.default, aten.dropout.default, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default,
}
_FEATURE_OPS = {aten.linear.default: 1, aten.layer_norm.default: None}  # ops over trailing axes: how many
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_MASK, _SDPA_CAUSAL = 3, 5


def activation_input(node: fx.Node) -> fx.Node:
    """The one non-parameter tensor a token-wise node reads (its first argument)."""
    return node.args[0]


def is_tokenwise(node: fx.Node) -> bool:
    """Acts on each position alone: a known op whose only activation input is its first argument."""
    if node.target not in TOKENWISE:
        return False
    others = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    return all(a.op == "get_attr" for a in others)


def _sizes(node: fx.Node) -> list[str] | None:
    value = node.meta.get("val")
    return [str(size) for size in value.shape] if isinstance(value, torch.Tensor) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class Layout:
    """(rank, sequence axis) of each node whose batch axis is the head input's and that has exactly one
    axis sized like its sequence, else None."""

    def __init__(self, entry: fx.Node):
        sizes = _sizes(entry)
        self.batch, self.seq = (sizes[0], sizes[1]) if sizes and len(sizes) == 3 else (None, None)
        self.known: dict[fx.Node, tuple[int, int] | None] = {entry: (3, 1)} if self.seq else {}

    def __call__(self, node: fx.Node) -> tuple[int, int] | None:
        if node not in self.known:
            self.known[node] = self._layout(node)
        return self.known[node]

    def _layout(self, node: fx.Node) -> tuple[int, int] | None:
        sizes = _sizes(node)
        if sizes is not None:
            if self.seq is None or sizes[:1] != [self.batch] or sizes.count(self.seq) != 1:
                return None
            return len(sizes), sizes.index(self.seq)
        if is_tokenwise(node):  # a pass's node: its input's layout
            return self(activation_input(node))
        if node.target in ELEMENTWISE:
            layouts = {self(a) for a in node.all_input_nodes}
            return layouts.pop() if len(layouts) == 1 else None
        return None


def row_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs a moved node reads as rows (attention: the query only; keys, values, mask stay whole)."""
    if node.target is _SDPA or node.target in _RESHAPES:
        return [node.args[0]]  # a reshape's size nodes are not rows
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _keeps_rows(node: fx.Node, layout: Layout) -> bool:
    """Each row of the node's output depends on that row of its row inputs alone."""
    out = layout(node)
    if node.op != "call_function" or out is None:
        return False
    rank, axis = out
    inputs = [layout(a) for a in row_inputs(node)]
    if any(i is None for i in inputs):
        return False
    if is_tokenwise(node):
        trailing = _FEATURE_OPS.get(node.target, 0)
        if trailing is None:  # layer_norm: over its normalized_shape
            trailing = len(node.args[1])
        return inputs == [out] and axis < rank - trailing
    if node.target in ELEMENTWISE:
        return all(i == out for i in inputs)
    if node.target is aten.transpose.int:
        dims = [d % rank for d in node.args[1:3]]
        (_, before), = inputs
        return axis == (dims[1] if before == dims[0] else dims[0] if before == dims[1] else before)
    if node.target in _RESHAPES:
        (_, before), = inputs
        source, target = _sizes(node.args[0]), _sizes(node)  # both start [batch, ..., seq]: what lies between must agree
        return before == axis and (axis == 1 or (source is not None and source[:axis] == target[:axis]))
    if node.target is _SDPA:
        mask = _arg(node, _SDPA_MASK, "attn_mask")
        known_mask = mask is None or (isinstance(mask, fx.Node) and len(_sizes(mask) or []) == 4)
        return (inputs == [out] and axis == rank - 2 and known_mask
                and not _arg(node, _SDPA_CAUSAL, "is_causal", False))
    return False


def movable(gm: fx.GraphModule, entry: fx.Node) -> list[fx.Node]:
    """The nodes (graph order, `entry` last) that can run on the gathered rows of `entry`: those that keep
    rows and whose users all moved and read them as rows. Empty when `entry` itself cannot."""
    layout = Layout(entry)
    if not _keeps_rows(entry, layout):
        return []
    chosen = {entry}
    for node in reversed(gm.graph.nodes):
        if node in chosen or not node.users:
            continue
        if all(u in chosen and node in row_inputs(u) for u in node.users) and _keeps_rows(node, layout):
            chosen.add(node)
    return [node for node in gm.graph.nodes if node in chosen]


def _gather(build: NodeBuilder, node: fx.Node, axis: int, rank: int, index: fx.Node) -> fx.Node:
    """`node`'s rows at `index` ([batch] positions) along `axis`, the axis kept with size 1."""
    shape = [1] * rank
    shape[0] = -1
    view = build(aten.view.default, index, shape)
    sizes = [-1 if d == 0 else 1 if d == axis else build(aten.sym_size.int, node, d) for d in range(rank)]
    return build(aten.gather.default, node, axis, build(aten.expand.default, view, sizes))


def _mask_rows(build: NodeBuilder, mask: fx.Node | None, query: fx.Node, index: fx.Node) -> fx.Node | None:
    """The attention mask's rows for the gathered queries ([.., q, k] masks; broadcast rows stay)."""
    sizes = _sizes(mask) if isinstance(mask, fx.Node) else None
    if sizes is None or len(sizes) != 4 or sizes[2] == "1":
        return mask
    batch = build(aten.sym_size.int, query, 0)
    whole = build(aten.expand.default, mask, [batch, -1, -1, -1])
    return _gather(build, whole, 2, 4, index)


def _copy(build: NodeBuilder, node: fx.Node, rows: dict[fx.Node, fx.Node], layout: Layout, index: fx.Node) -> fx.Node:
    """`node` recomputed on rows; a reshape's target size on the sequence axis becomes 1."""
    remap = {a: rows[a] for a in row_inputs(node)}
    if node.target is _SDPA:
        mask = _arg(node, _SDPA_MASK, "attn_mask")
        if isinstance(mask, fx.Node):
            remap[mask] = _mask_rows(build, mask, remap[node.args[0]], index)
    copied = build.copy(node, remap)
    if node.target in _RESHAPES:
        shape = list(copied.args[1])
        shape[layout(node)[1]] = 1
        copied.update_arg(1, shape)
    copied.meta.pop("val", None)  # it holds the gathered rows now
    return copied


def rows_at(build: NodeBuilder, gm: fx.GraphModule, entry: fx.Node, index_for: Callable[[fx.Node, int], fx.Node],
            *, move: bool = True) -> tuple[fx.Node, list[fx.Node]]:
    """`entry` ([batch, seq, width]) at one position per example, as [batch, 1, width], and the
    full-length nodes the caller erases once nothing else reads them (after dropping its own
    full-length users of `entry`). `index_for(hidden, axis)` gives the [batch] positions, given a node
    that stays, laid out like the hidden states along `axis` (their sequence may exceed the input ids')."""
    layout = Layout(entry)
    moved = movable(gm, entry) if move else []
    sources = list(dict.fromkeys(a for n in moved for a in row_inputs(n) if a not in moved)) or [entry]
    placed = {source: layout(source) or (3, 1) for source in sources}
    index = index_for(sources[0], placed[sources[0]][1])
    rows: dict[fx.Node, fx.Node] = {}
    for source, (rank, axis) in placed.items():
        rows[source] = _gather(build, source, axis, rank, index)
    for node in moved:
        rows[node] = _copy(build, node, rows, layout, index)
    return rows[entry], moved


def select_rows(gm: fx.GraphModule) -> int:
    """Every `hidden[:, i]` (constant i) of [batch, seq, width] hidden states nothing else reads gets the
    rows treatment: BERT's pooler reads `[CLS]`, so the last block computes that row alone. Returns
    how many nodes now run on one row."""
    total = 0
    for select in list(gm.graph.find_nodes(op="call_function", target=aten.select.int)):
        source, dim, position = select.args
        if dim != 1 or not isinstance(position, int) or position < 0 or list(source.users) != [select] \
                or not movable(gm, source):
            continue
        build = NodeBuilder(gm.graph, select, before=select)

        def index_for(hidden: fx.Node, axis: int, position=position, build=build) -> fx.Node:
            return build(aten.new_full.default, hidden, [build(aten.sym_size.int, hidden, 0)], position,
                         dtype=torch.long)

        rows, moved = rows_at(build, gm, source, index_for)
        select.replace_all_uses_with(build(aten.squeeze.dims, rows, [1]))
        for node in [select, *reversed(moved)]:
            gm.graph.erase_node(node)
        total += len(moved)
    if total:
        gm.recompile()
    return total
