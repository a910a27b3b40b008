"""Graph queries: which module made a node, where the projections, the inputs, the word embedding and
the MLM head are, and what role each projection plays.

Roles are read off the graph, not a name table: the projection whose output reaches the query, key
or value operand of attention (`scaled_dot_product_attention`, or an eager matmul-softmax-matmul)
is q, k or v; the one that consumes attention's output is o. Fused projections (GPT-2's `c_attn`,
BLOOM's `query_key_value`) carry several roles.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import torch
from torch import fx

from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.ir import info, tag, tensor_at
from rewrite.graph.row_gather import is_tokenwise

aten = torch.ops.aten

ATTENTION_ROLES = ("q", "k", "v", "o")
ROLES = (*ATTENTION_ROLES, "mlp", "down")
_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_TRANSPOSE = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
_SEARCH_DEPTH = 48
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")  # PEFT's layers_to_transform rule
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")
_BLOCK = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")  # a module's repeated block: `model.layers.3` of `model.layers.3.mlp.up`


def block_of(path: str) -> str | None:
    """The repeated block a module path lies in (`model.layers.3` of `model.layers.3.mlp.up`), if any."""
    match = _BLOCK.match(path)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Projection:
    """A matrix multiply by a 2-D parameter: `y = x @ W.T (+ b)`, or `x @ W` when `transposed`. On a quantized
    projection (`rewrite.graph.quantized`) `weight` names the packed weights."""

    node: fx.Node
    input: fx.Node
    weight: str
    path: str
    transposed: bool
    in_features: int
    out_features: int

    @property
    def layer(self) -> int | None:
        return layer_index(self.path)

    @property
    def quantized(self) -> bool:
        return quantized.is_quantized(self.node)


def weight_dtype(gm: fx.GraphModule, proj: Projection) -> tuple[torch.dtype, torch.device]:
    """The dtype and device the projection computes in (its scales', when quantized)."""
    weight = tensor_at(gm, proj.node.args[2].target if proj.quantized else proj.weight)
    return weight.dtype, weight.device


def later_first(gm: fx.GraphModule, projections: list[Projection]) -> list[Projection]:
    """Projections in reverse graph order, for replacing their nodes one by one: a projection whose input is an
    earlier projection's output (ALBERT's embedding mapping feeds the attention) still reads a live node, which
    the earlier one's replacement then rewires."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(projections, key=lambda p: order[p.node], reverse=True)


def layer_index(path: str) -> int | None:
    """The layer number in a module path (`model.layers.3.self_attn.q_proj` -> 3), read as PEFT reads it."""
    match = _LAYER_INDEX.match(path)
    return int(match.group(1)) if match else None


def matches_module(path: str, spec: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex that must fullmatch; a list entry matches exactly or as a `.suffix`."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def module_path(node: fx.Node) -> str | None:
    """The module that produced `node`: the innermost entry of `nn_module_stack`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return path


def _param_target(node) -> tuple[str, bool] | None:
    """(get_attr target, transposed-once) when `node` is a 2-D parameter, possibly behind one transpose."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target, False
    if node.op == "call_function" and node.target in (aten.t.default, aten.numpy_T.default):
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "get_attr":
            return inner.target, True
    return None


def _as_projection(gm: fx.GraphModule, node: fx.Node) -> Projection | None:
    if node.op != "call_function" or tag(node):
        return None
    if quantized.is_quantized(node):
        x, qweight, *_, k, n, _, _ = node.args
        return Projection(node, x, qweight.target, module_path(node) or qweight.target.rpartition(".")[0], False, k, n)
    if node.target is aten.linear.default:
        x, weight_node, stored_in_out = node.args[0], node.args[1], False
    elif node.target is aten.addmm.default:
        x, weight_node, stored_in_out = node.args[1], node.args[2], True
    elif node.target in (aten.mm.default, aten.matmul.default):
        x, weight_node, stored_in_out = node.args[0], node.args[1], True
    else:
        return None
    found = _param_target(weight_node)
    if found is None:
        return None
    target, flipped = found
    weight = tensor_at(gm, target)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
        return None
    transposed = stored_in_out != flipped
    in_features, out_features = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    path = module_path(node) or target.rpartition(".")[0]
    return Projection(node, x, target, path, transposed, int(in_features), int(out_features))


def _matmul_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The two multiplied operands (`baddbmm(bias, a, b)` multiplies its 2nd and 3rd)."""
    return (node.args[1], node.args[2]) if node.target is aten.baddbmm.default else (node.args[0], node.args[1])


class GraphQuery:
    """Read-only questions about one graph, answered once (the graph must not change while it is used)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    @cached_property
    def digraph(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        for node in self.gm.graph.nodes:
            graph.add_node(node)
            for user in node.users:
                graph.add_edge(node, user)
        return graph

    @cached_property
    def projections(self) -> list[Projection]:
        found = (_as_projection(self.gm, node) for node in self.gm.graph.nodes)
        return [p for p in found if p is not None]

    @cached_property
    def _by_node(self) -> dict[fx.Node, Projection]:
        return {p.node: p for p in self.projections}

    def _nearest(self, start: fx.Node, forward: bool) -> set[fx.Node]:
        """Projection nodes first reached from `start` (upstream, or downstream when `forward`)."""
        if not forward and start in self._by_node:
            return {start}
        found: set[fx.Node] = set()
        seen = {start}
        queue = deque([(start, 0)])
        step = self.digraph.successors if forward else self.digraph.predecessors
        while queue:
            node, depth = queue.popleft()
            for nxt in step(node):
                if nxt in seen:
                    continue
                seen.add(nxt)
                if nxt in self._by_node:
                    found.add(nxt)
                elif depth < _SEARCH_DEPTH and nxt.op == "call_function" and nxt.target is not _SDPA:
                    queue.append((nxt, depth + 1))
        return found

    def _attention_operands(self) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
        """(q, k, v, output) operand nodes of every attention in the graph."""
        found = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is _SDPA:
                found.append((node.args[0], node.args[1], node.args[2], node))
            elif node.target in _SOFTMAX:
                eager = self._eager_attention(node)
                if eager:
                    found.append(eager)
        return found

    def _eager_attention(self, softmax: fx.Node):
        """matmul(q, k^T) -> ... -> softmax -> ... -> matmul(probs, v), found by walking from the softmax."""
        scores = self._nearest_op(softmax, _MATMUL, forward=False)
        mixed = self._nearest_op(softmax, _MATMUL, forward=True)
        if scores is None or mixed is None:
            return None
        q, k = _matmul_operands(scores)
        left, right = _matmul_operands(mixed)
        value = right if nx.has_path(self.digraph, softmax, left) else left
        return q, k, value, mixed

    def _nearest_op(self, start: fx.Node, ops: set, forward: bool, limit: int = 6) -> fx.Node | None:
        """The closest node running one of `ops`, within `limit` steps (breadth first)."""
        step = self.digraph.successors if forward else self.digraph.predecessors
        frontier = [start]
        for _ in range(limit):
            frontier = [n for node in frontier for n in step(node) if n.op == "call_function"]
            for node in frontier:
                if node.target in ops:
                    return node
        return None

    @cached_property
    def roles(self) -> dict[str, set[str]]:
        """Module path -> roles (q, k, v, o, mlp, down) found structurally.

        mlp is every other projection inside a repeated block (a numbered module path) that is not
        an output head; down is also an mlp projection that reads another of its layer's (LLaMA's
        `down_proj`, BERT's `output.dense`, GPT-2's `mlp.c_proj`: PEFT IA3's feed-forward modules).
        """
        roles: dict[str, set[str]] = {}
        for q, k, v, out in self._attention_operands():
            for role, operand in (("q", q), ("k", k), ("v", v)):
                for node in self._nearest(operand, forward=False):
                    roles.setdefault(self._by_node[node].path, set()).add(role)
            for node in self._nearest(out, forward=True):
                roles.setdefault(self._by_node[node].path, set()).add("o")
        heads = {p.path for p in self.output_heads}
        for p in self.projections:
            if p.path not in roles and p.path not in heads and _IN_BLOCK.search(p.path):
                roles[p.path] = {"mlp"}
        for p in self.projections:
            if "mlp" in roles.get(p.path, ()) and any(
                    "mlp" in roles.get(self._by_node[n].path, ())
                    and block_of(self._by_node[n].path) == block_of(p.path)
                    for n in self._nearest(p.input, forward=False)):
                roles[p.path].add("down")
        return roles

    @cached_property
    def output_heads(self) -> list[Projection]:
        """Projections with no projection downstream: the output layer `"all-linear"` leaves alone."""
        nodes = set(self._by_node)
        return [p for p in self.projections if not (nx.descendants(self.digraph, p.node) & nodes)]

    @cached_property
    def head_modules(self) -> list[str]:
        """The modules that hold the output heads whole, as PEFT's `modules_to_save` names them: for each
        output head, its shallowest enclosing module with no attention or block projection inside
        (RoBERTa's `classifier` holds `classifier.dense` and `classifier.out_proj`; LLaMA's is `score`)."""
        inside = [p.path for p in self.projections if p.path in self.roles]
        found: list[str] = []
        for head in self.output_heads:
            parts = head.path.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            found.append(next(m for m in prefixes if not any(_within(path, m) for path in inside)))
        return list(dict.fromkeys(found))


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The graph's inputs by name."""
    return {node.target: node for node in gm.graph.find_nodes(op="placeholder")}


_EXTENDS = "extends"


def mark_extended(node: fx.Node, name: str) -> None:
    """Marks `node` (made by a pass's builder) as graph input `name` extended, e.g. with prepended positions."""
    node.meta["rewrite"][_EXTENDS] = name


def model_input(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """Input `name` as the model sees it: the extended tensor when a pass extended it (prompt tuning
    prepends virtual positions: `mark_extended`), else the placeholder.

    A pass that runs later and reads `input_ids` or `attention_mask` (e.g. to find the `[MASK]`
    position) must read this node, or its positions are off by the prepended positions.
    """
    for node in gm.graph.nodes:
        if tag(node).get(_EXTENDS) == name:
            return node
    return placeholders(gm).get(name)


# Ops that hand token ids on unchanged in value: views, reshapes, casts, clamps, copies, and the slice the
# prompt pass puts in front of the lookup to drop its virtual ids.
_ID_CARRIERS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten._to_copy.default, aten.to.dtype,
    aten.clamp.default, aten.clone.default, aten.alias.default, aten.contiguous.default, aten.slice.Tensor,
}


def architecture(gm: fx.GraphModule) -> str:
    """The model's architecture name for messages: the config's `model_type`, else the captured class."""
    return getattr(info(gm).config, "model_type", None) or info(gm).model_class or "captured"


LOOKUPS = (aten.embedding.default, quantized.GATHER)  # `(table, ids, ...)` both


def word_embedding(gm: fx.GraphModule, needed_for: str) -> fx.Node:
    """The `aten.embedding` (or quantized lookup) that looks up `input_ids`, found by dataflow: the ids may reach
    it through views, reshapes, casts and clamps (GPT-2 and OPT read `view(input_ids, [-1, seq])`), or through the
    prompt-extended ids a prompt pass made. The first such lookup in graph order is the word embedding:
    where prompt vectors enter the model, and the table a tied MLM decoder reads. `needed_for` ends the
    error message."""
    ids = placeholders(gm).get("input_ids")
    carriers, queue = {ids}, deque([ids] if ids is not None else [])
    while queue:
        node = queue.popleft()
        for user in node.users:
            passes_on = user.target in _ID_CARRIERS and user.args[0] is node
            if user not in carriers and (passes_on or tag(user).get(_EXTENDS) == "input_ids"):
                carriers.add(user)
                queue.append(user)
    for node in gm.graph.nodes:
        if node.target in LOOKUPS and ids is not None and node.args[1] in carriers:
            return node
    raise RewriteError(f"the {architecture(gm)} graph has no word-embedding lookup fed by an `input_ids` input "
                       f"(through views, reshapes, casts or clamps); {needed_for}")


def lookup_table(gm: fx.GraphModule, lookup: fx.Node) -> torch.Tensor:
    """The float `[vocab, hidden]` table a lookup reads: a quantized one's dequantized, the rows it computes with."""
    if quantized.is_quantized_lookup(lookup):
        return quantized.dequantized_table(gm, lookup)
    return tensor_at(gm, lookup.args[0].target)


def embedding_output(lookup: fx.Node) -> fx.Node:
    """The word-embedding module's output: the lookup, or the last node after it inside the same module
    (Gemma's embedding scales the rows it looks up). Prompts join the sequence here, where PEFT's
    `inputs_embeds` do."""
    path, node = module_path(lookup), lookup
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or module_path(user) != path or user.args[0] is not node:
            break
        node = user
    return node


@dataclass
class MlmHead:
    """The graph's MLM head: `entry` (hidden states) -> token-wise `transform` nodes -> `decoder`."""

    embedding: fx.Node
    decoder: Projection
    transform: list[fx.Node]
    entry: fx.Node

    @property
    def ids(self) -> fx.Node:
        """The token ids the word embedding reads: the user's (prompt tuning slices its virtual ids off before the lookup)."""
        return self.embedding.args[1]

    @property
    def embedding_weight(self) -> fx.Node:
        return self.embedding.args[0]


def find_mlm_head(gm: fx.GraphModule) -> MlmHead:
    """Reads the head off the graph: the projection onto the vocabulary that feeds the output, and the
    token-wise nodes before it that lie outside the base model (the module owning the word embedding)."""
    embedding = word_embedding(gm, "an MLM head is read off a token-input masked LM")
    vocab = tensor_at(gm, embedding.args[0].target).shape[0]
    heads = [p for p in GraphQuery(gm).output_heads if p.out_features == vocab]
    if len(heads) != 1:
        raise RewriteError(
            f"found {len(heads)} projections onto the {vocab}-word vocabulary at the graph's output; a "
            "masked-LM graph with one MLM decoder is needed (capture with --task masked-lm)"
        )
    decoder = heads[0]
    transform, entry = _head_region(gm, decoder, (module_path(embedding) or "").partition(".")[0])
    return MlmHead(embedding, decoder, transform, entry)


_ELEMENTWISE = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.tanh.default,
    aten.erf.default, aten.mul.Scalar, aten.add.Scalar,
}


def _head_region(gm: fx.GraphModule, decoder: Projection, base: str) -> tuple[list[fx.Node], fx.Node]:
    """The head's nodes between the base model and the decoder, in graph order, and the one base-model node
    they read. Each acts on every position alone: a linear, norm or activation layer, or the element-wise
    arithmetic a multi-op activation is made of (ALBERT's gelu_new)."""
    region: set[fx.Node] = set()
    entries: set[fx.Node] = set()
    stack = [decoder.input]
    while stack:
        node = stack.pop()
        if node in region or node in entries:
            continue
        if node.op != "call_function" or _in_module(node, base):
            entries.add(node)
            continue
        if not (is_tokenwise(node) or node.target in _ELEMENTWISE):
            raise RewriteError(
                f"an MLM head on {architecture(gm)} is not supported: it has a layer other than linear, norm, "
                f"activation and element-wise arithmetic (node {node.name}, {node.target}), and only such a head "
                "can be read at one position"
            )
        region.add(node)
        stack.extend(a for a in node.all_input_nodes if a.op != "get_attr")
    if len(entries) != 1:
        raise RewriteError(f"an MLM head on {architecture(gm)} is not supported: it reads {len(entries)} tensors of "
                           "the base model, and only a head that reads one can be read at one position")
    for node in region:
        if any(user not in region and user is not decoder.node for user in node.users):
            raise RewriteError(f"the MLM head's node {node.name} is also used outside the head; it cannot be pruned")
    return [node for node in gm.graph.nodes if node in region], entries.pop()


def _in_module(node: fx.Node, base: str) -> bool:
    path = module_path(node) or ""
    return path == base or path.startswith(base + ".")
