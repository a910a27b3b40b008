"""Decoder attention with a cache onto ONNX Runtime's `com.microsoft.GroupQueryAttention`.

The rule matches what onnxscript's intermediate fusions leave of one attention layer (rotate-half rotary as
`_fusion.RotaryEmbedding`, the scaled dot product as `_fusion.SDPA`): the q/k/v projections reshaped to heads,
rotary on q and k, the past concatenated in front of the new keys and values (the presents), the KV heads
repeated, the attention, and the heads merged back. It becomes one GroupQueryAttention over the unpacked
projections (so adapter slots on them stay), rotary inside, KV heads unrepeated: the op reads each row's length
from the attention mask (`seqlens_k`, rows padded on the right) and numbers positions itself, so the mask and
rotary builders and `position_ids` fall away.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

FUSION = "ai.onnxruntime._fusion"  # onnxscript's domain for intermediate fused ops
MASK = "attention_mask"
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
MASK_INPUTS = {"input_ids", "position_ids", MASK}  # what a model's own mask builder may read besides the past


@dataclass
class Attention:
    """What the rule needs from outside the graph and what it found: the model's config, the position limit the
    rotary caches span, and each layer's reason when its attention matched but could not be lowered."""

    config: object
    positions: int
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

    def __init__(self, context: Attention):
        super().__init__("GroupQueryAttention", remove_nodes=False)
        self.context = context

    def pattern(self, op, q_bsd, k_bsd, v_bsd, past_k, past_v, cos, sin, mask):
        q = op.Transpose(op.Reshape(q_bsd, pattern.ANY_VALUE, _outputs=["q_heads"]), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(k_bsd, pattern.ANY_VALUE, _outputs=["k_heads"]), perm=[0, 2, 1, 3])
        v = op.Transpose(op.Reshape(v_bsd, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        q_rotated = op.RotaryEmbedding(q, cos, sin, _domain=FUSION, _allow_other_attributes=True, _outputs=["q_rot"])
        k_rotated = op.RotaryEmbedding(k, cos, sin, _domain=FUSION, _allow_other_attributes=True)
        present_k = op.Concat(past_k, k_rotated, axis=-2)
        present_v = op.Concat(past_v, v, axis=-2)
        k_all = pattern.OrValue([op.Reshape(op.Expand(op.Unsqueeze(present_k, pattern.ANY_VALUE), pattern.ANY_VALUE),
                                            pattern.ANY_VALUE), present_k])  # one KV head per head: no repeat
        v_all = pattern.OrValue([op.Reshape(op.Expand(op.Unsqueeze(present_v, pattern.ANY_VALUE), pattern.ANY_VALUE),
                                            pattern.ANY_VALUE), present_v])
        attended = op.SDPA(q_rotated, k_all, v_all, mask, key_format="BHSd", _domain=FUSION,
                           _allow_other_attributes=True, _outputs=["sdpa"])
        out = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), pattern.ANY_VALUE)
        return out, present_k, present_v

    def check(self, context, q_heads, k_heads, past_k, past_v, cos, sin, mask, q_rot, sdpa, **_):
        result = pattern.MatchResult()
        layer = _layer(past_k, "key")
        if layer is None or _layer(past_v, "value") != layer:
            return result.fail("the past is not the model's cache input (a constant prefix in front of it)", past_k)
        sdpa_node = sdpa.producer()
        heads = [_ir_utils.get_dim(v, 2) for v in (q_heads, k_heads)]
        head = _ir_utils.get_dim(q_heads, 3)
        refusal = self._refusal(heads, head, cos, sin, mask, q_rot, sdpa_node)
        if refusal:
            self.context.refused[layer] = refusal
            return result.fail(refusal)
        self.layer, (self.heads, self.kv_heads) = layer, heads
        self.scale = sdpa_node.attributes.get_float("scale", None)
        return result

    def _refusal(self, heads, head, cos, sin, mask, q_rot, sdpa_node) -> str | None:
        """Why this layer's attention cannot be GroupQueryAttention, or None."""
        if not all(isinstance(n, int) for n in [*heads, head]):
            return "its head counts are not static"
        inv_freq, sin_freq = _inv_freq(cos, "Cos"), _inv_freq(sin, "Sin")
        if inv_freq is None or sin_freq is None or not np.array_equal(inv_freq, sin_freq):
            return "its rotary angles are not constant inverse frequencies times positions (scaled rotary)"
        if head % 16 or len(inv_freq) * 2 != head or len(inv_freq) % 8:
            return (f"head size {head} with rotary size {len(inv_freq) * 2}: GroupQueryAttention rotates inside only "
                    "whole heads whose size is a multiple of 16")
        if q_rot.producer().attributes.get_int("interleaved", 0):
            return "its rotary is interleaved"
        sources = _sources(mask)
        if MASK not in sources or any(s not in MASK_INPUTS and not PAST.fullmatch(s) for s in sources):
            return "its attention mask is not built from the attention_mask input alone"
        if sdpa_node.attributes.get_float("softcap", 0.0):
            return "its scores are soft-capped"
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

    def rewrite(self, op, q_bsd, k_bsd, v_bsd, past_k, past_v, **_):
        mask = self.context.mask
        seqlens_k = op.Cast(op.Sub(op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0), op.Constant(value_int=1)),
                            to=ir.DataType.INT32)
        total = op.Cast(op.Gather(op.Shape(mask), op.Constant(value_int=1), axis=0), to=ir.DataType.INT32)
        cos, sin = self._rotary_caches(past_k.dtype)
        attributes = dict(num_heads=self.heads, kv_num_heads=self.kv_heads, do_rotary=1, rotary_interleaved=0,
                          local_window_size=window(self.context.config, self.layer))
        if self.scale is not None:
            attributes["scale"] = self.scale
        return op.GroupQueryAttention(q_bsd, k_bsd, v_bsd, past_k, past_v, seqlens_k, total, cos, sin,
                                      _domain="com.microsoft", _outputs=3, **attributes)
