"""Decoder attention with a cache onto ONNX Runtime's `com.microsoft.GroupQueryAttention`.

The rule matches what onnxscript's intermediate fusions leave of one attention layer (rotate-half rotary as
`_fusion.RotaryEmbedding`, the scaled dot product as `_fusion.SDPA`): the q/k/v projections reshaped to heads,
rotary on q and k where the model has it (GPT-2 and OPT add learned positions to the embeddings instead), the past
concatenated in front of the new keys and values (the presents), the KV heads repeated, the attention, and the heads
merged back. It becomes one GroupQueryAttention, rotary inside, KV heads unrepeated, over the projections (adapter
slots on them stay): q/k/v cut in order from one packed projection (GPT-2's c_attn, Phi-3's qkv_proj) go in packed,
others unpacked. The op reads each row's length from the attention mask (`seqlens_k`, rows padded on the right) and
numbers rotary positions itself, so the mask and rotary builders fall away, and `position_ids` with them unless the
model still reads it for its embeddings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

ATTENTION = "GroupQueryAttention"  # the op every lowered layer becomes (com.microsoft)
FUSION = "ai.onnxruntime._fusion"  # onnxscript's domain for intermediate fused ops
MASK = "attention_mask"
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
MASK_INPUTS = {"input_ids", "position_ids", MASK}  # what a model's own mask builder may read besides the past


@dataclass
class Attention:
    """What the rule needs from outside the graph and what it found: the model's config, the position limit the
    rotary caches span (None where the model sets none), and each layer's reason when its attention matched but
    could not be lowered."""

    config: object
    positions: int | None
    mask: ir.Value
    graph: ir.Graph
    refused: dict[int, str] = field(default_factory=dict)
    caches: dict[bytes, tuple[ir.Value, ir.Value]] = field(default_factory=dict)


def _inv_freq(table: ir.Value, function: str) -> np.ndarray | None:
    """The constant inverse frequencies behind `Unsqueeze(function(Concat(f, f)))`, `f = Mul(positions, inv_freq)`
    (Hugging Face's default rotary, `function` Cos or Sin); None for any other table (scaled, computed otherwise)."""
    node = table.producer()
    for op_type in ("Unsqueeze", function, "Concat"):
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        if op_type == "Concat" and (len(node.inputs) != 2 or node.inputs[0] is not node.inputs[1]):
            return None
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Mul":
        return None
    constants = [x.const_value for x in node.inputs if x is not None and x.const_value is not None]
    return constants[0].numpy().reshape(-1).astype(np.float32) if len(constants) == 1 else None


def _layer(past: ir.Value, kind: str) -> int | None:
    """The layer whose cache input `past` is (`past_key_values.3.key` -> 3); None for anything else."""
    found = PAST.fullmatch(past.name or "") if past.is_graph_input() else None
    return int(found.group(1)) if found and found.group(2) == kind else None


def _sources(value: ir.Value) -> set[str]:
    """The graph inputs `value` is computed from."""
    seen, stack, found = set(), [value], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        node = current.producer()
        if node is None:
            if current.is_graph_input():
                found.add(current.name)
            continue
        stack.extend(node.inputs)
    return found


def sort_sum_dims(graph: ir.Graph) -> None:
    """Writes every symbolic sum dim with its terms sorted: the exporter names the present value's length
    `sequence + past_sequence` and the key's `past_sequence + sequence`, which the SDPA fusion takes for two sizes."""
    values = [*graph.inputs, *(out for node in graph for out in node.outputs)]
    for value in values:
        if value.shape is not None and any(_is_sum(dim) for dim in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(" + ".join(sorted(dim.value.split(" + ")))) if _is_sum(dim) else dim
                                    for dim in value.shape])


def _is_sum(dim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and dim.value is not None and " + " in dim.value and "(" not in dim.value


def _piece(value: ir.Value) -> tuple[ir.Value, int, int] | None:
    """`(source, start, end)` when `value` is a static cut of `source` along its last axis (a Split output or a
    Slice with constant bounds); None otherwise."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.inputs[0].shape is None:
        return None
    source = node.inputs[0]
    rank, width = len(source.shape), source.shape[-1]
    if node.op_type == "Split" and node.attributes.get_int("axis", 0) in (-1, rank - 1):
        widths = [out.shape[-1] if out.shape is not None else None for out in node.outputs]
        if all(isinstance(w, int) for w in widths):
            start = sum(widths[:value.index()])
            return source, start, start + widths[value.index()]
    if node.op_type == "Slice" and isinstance(width, int):
        bounds = [_ir_utils.get_singleton_value(x) if x is not None else None for x in node.inputs[1:5]]
        start, end, axis, step = bounds + [None] * (4 - len(bounds))
        if axis in (-1, rank - 1) and step in (None, 1) and isinstance(start, int) and isinstance(end, int):
            return source, start, min(end, width)
    return None


def packed_source(q: ir.Value, k: ir.Value, v: ir.Value) -> ir.Value | None:
    """The projection q, k and v are cut from in that order, back to back and covering it, or None."""
    pieces = [_piece(x) for x in (q, k, v)]
    if None in pieces or len({id(source) for source, _, _ in pieces}) != 1:
        return None
    source, ends = pieces[0][0], [0] + [end for _, _, end in pieces]
    if any(start != ends[i] for i, (_, start, _) in enumerate(pieces)) or ends[-1] != source.shape[-1]:
        return None
    return source if len(source.shape) == 3 else None  # GroupQueryAttention's packed query: [batch, sequence, qkv]


def window(config, layer: int) -> int:
    """GroupQueryAttention's `local_window_size` for `layer` (each query sees that many keys, its own included,
    as Hugging Face's sliding mask); -1 for full attention."""
    size = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not size or (types is not None and types[layer] != "sliding_attention"):
        return -1
    if getattr(config, "use_sliding_window", True) is False:
        return -1
    return int(size)


class GroupQueryAttention(pattern.RewriteRuleClassBase):
    """One attention layer with a cache -> `com.microsoft.GroupQueryAttention` (see the module docstring)."""

    def __init__(self, context: Attention, rotary: bool):
        super().__init__("GroupQueryAttention" + ("Rotary" if rotary else ""), remove_nodes=False)
        self.context, self.rotary = context, rotary

    def pattern(self, op, q_bsd, k_bsd, v_bsd, past_k, past_v, cos, sin, mask, merged_shape):
        q = op.Transpose(op.Reshape(q_bsd, pattern.ANY_VALUE, _outputs=["q_heads"]), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(k_bsd, pattern.ANY_VALUE, _outputs=["k_heads"]), perm=[0, 2, 1, 3])
        v = op.Transpose(op.Reshape(v_bsd, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        if self.rotary:
            q = op.RotaryEmbedding(q, cos, sin, _domain=FUSION, _allow_other_attributes=True, _outputs=["q_rot"])
            k = op.RotaryEmbedding(k, cos, sin, _domain=FUSION, _allow_other_attributes=True)
        present_k = op.Concat(past_k, k, axis=-2)
        present_v = op.Concat(past_v, v, axis=-2)
        k_all = pattern.OrValue([op.Reshape(op.Expand(op.Unsqueeze(present_k, pattern.ANY_VALUE), pattern.ANY_VALUE),
                                            pattern.ANY_VALUE), present_k])  # one KV head per head: no repeat
        v_all = pattern.OrValue([op.Reshape(op.Expand(op.Unsqueeze(present_v, pattern.ANY_VALUE), pattern.ANY_VALUE),
                                            pattern.ANY_VALUE), present_v])
        attended = op.SDPA(q, k_all, v_all, mask, key_format="BHSd", _domain=FUSION,
                           _allow_other_attributes=True, _outputs=["sdpa"])
        attended = pattern.OrValue([op.Reshape(attended, pattern.ANY_VALUE, _outputs=["reshaped"]), attended])
        out = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), merged_shape, _outputs=["merged"])
        return out, present_k, present_v

    def check(self, context, q_heads, k_heads, past_k, past_v, mask, sdpa, cos=None, sin=None, q_rot=None,
              reshaped=None, **_):
        result = pattern.MatchResult()
        if reshaped is not None and (reshaped.shape is None or reshaped.shape != sdpa.shape):
            return result.fail("the attention's output is reshaped to other than its own shape", reshaped)
        layer = _layer(past_k, "key")
        if layer is None or _layer(past_v, "value") != layer:
            return result.fail("the past is not the model's cache input (a constant prefix in front of it)", past_k)
        sdpa_node = sdpa.producer()
        heads = [_ir_utils.get_dim(v, 2) for v in (q_heads, k_heads)]
        head = _ir_utils.get_dim(q_heads, 3)
        refusal = self._refusal(heads, head, mask, sdpa_node)
        if refusal is None and self.rotary:
            refusal = self._rotary_refusal(head, cos, sin, q_rot)
        if refusal:
            self.context.refused[layer] = refusal
            return result.fail(refusal)
        self.layer, (self.heads, self.kv_heads) = layer, heads
        self.scale = sdpa_node.attributes.get_float("scale", None)
        return result

    def _refusal(self, heads, head, mask, sdpa_node) -> str | None:
        """Why this layer's attention cannot be GroupQueryAttention, or None."""
        if not all(isinstance(n, int) for n in [*heads, head]):
            return "its head counts are not static"
        if mask.shape is None or len(mask.shape) != 4 or mask.shape[1] != 1:
            return "its attention mask is not one [batch, 1, query, key] mask for all heads (per-head bias: ALiBi)"
        sources = _sources(mask)
        if MASK not in sources or any(s not in MASK_INPUTS and not PAST.fullmatch(s) for s in sources):
            return "its attention mask is not built from the attention_mask input alone"
        if sdpa_node.attributes.get_float("softcap", 0.0):
            return "its scores are soft-capped"
        return None

    def _rotary_refusal(self, head, cos, sin, q_rot) -> str | None:
        """Why GroupQueryAttention cannot turn this layer's rotary itself, or None."""
        if self.context.positions is None:
            return "the model sets no position limit, which sizes the rotary caches"
        inv_freq, sin_freq = _inv_freq(cos, "Cos"), _inv_freq(sin, "Sin")
        if inv_freq is None or sin_freq is None or not np.array_equal(inv_freq, sin_freq):
            return "its rotary angles are not constant inverse frequencies times positions (scaled rotary)"
        if head % 16 or len(inv_freq) * 2 != head or len(inv_freq) % 8:
            return (f"head size {head} with rotary size {len(inv_freq) * 2}: GroupQueryAttention rotates inside only "
                    "whole heads whose size is a multiple of 16")
        if q_rot.producer().attributes.get_int("interleaved", 0):
            return "its rotary is interleaved"
        self.inv_freq = inv_freq
        return None

    def _rotary_caches(self, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
        """cos and sin `[positions, rotary/2]` as initializers, shared by every layer with the same frequencies; the
        angles are fp32 products, as Hugging Face's rotary computes them (a float64 angle differs by ~1e-4 at
        position 2000)."""
        key = self.inv_freq.tobytes() + dtype.name.encode()
        caches = self.context.caches
        if key not in caches:
            angles = np.arange(self.context.positions, dtype=np.float32)[:, None] * self.inv_freq[None]
            numpy_type = dtype.numpy()
            caches[key] = tuple(self._initializer(f"rewrite_rotary_{name}_{len(caches)}", fn(angles).astype(numpy_type))
                                for name, fn in (("cos", np.cos), ("sin", np.sin)))
        return caches[key]

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.context.graph.register_initializer(value)
        return value

    def rewrite(self, op, q_bsd, k_bsd, v_bsd, past_k, past_v, merged, merged_shape, **_):
        mask = self.context.mask
        seqlens_k = op.Cast(op.Sub(op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0), op.Constant(value_int=1)),
                            to=ir.DataType.INT32)
        total = op.Cast(op.Gather(op.Shape(mask), op.Constant(value_int=1), axis=0), to=ir.DataType.INT32)
        rotary = self._rotary_caches(past_k.dtype) if self.rotary else ()
        attributes = dict(num_heads=self.heads, kv_num_heads=self.kv_heads, do_rotary=int(self.rotary),
                          rotary_interleaved=0, local_window_size=window(self.context.config, self.layer))
        if self.scale is not None:
            attributes["scale"] = self.scale
        packed = packed_source(q_bsd, k_bsd, v_bsd)
        qkv = (packed, None, None) if packed is not None else (q_bsd, k_bsd, v_bsd)
        out, present_k, present_v = op.GroupQueryAttention(*qkv, past_k, past_v, seqlens_k, total, *rotary,
                                                           _domain="com.microsoft", _outputs=3, **attributes)
        if merged.shape is None or len(merged.shape) != 3:  # GPT-2 merges the heads straight into [tokens, hidden]
            out = op.Reshape(out, merged_shape)
        return out, present_k, present_v


def attention_rules(context: Attention) -> pattern.RewriteRuleSet:
    """The rule for attention with rotary and without."""
    return pattern.RewriteRuleSet([GroupQueryAttention.rule(context, rotary) for rotary in (True, False)])
