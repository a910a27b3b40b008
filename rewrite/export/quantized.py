"""Quantized projections (`rewrite.graph.quantized`) written as ONNX Runtime's `com.microsoft.MatMulNBits`: one node
whose B, scales and zero points are the graph's own buffers, byte for byte. NF4 projections become
`com.microsoft.MatMulBnb4` (NF4, `quant_type` 1) over the same packed bytes; a double-quantized absmax is undone in
the graph, `dynamic[qabsmax] * absmax2 + offset` in fp32 as bitsandbytes computes it, which ONNX Runtime folds into a
constant (the kernel is bit-equal to bitsandbytes' dequantization, and about 10x slower than fp32 on CPU); in an
fp16 model the absmax is cast to fp16, the kernel's type for it.
A quantized lookup becomes `com.microsoft.GatherBlockQuantized` over MatMulNBits' packing viewed `[vocab, bytes]`
(bit-equal to ours; a hidden size that is no multiple of the block comes back padded, and is sliced).

onnx ships no schema for Microsoft's operators and the exporter's tracer needs one, so MatMulNBits' is registered
here once. `accuracy_level` 0 (the default) multiplies in fp32 with exactly the dequantized weights torch
computes with, so an export verifies within 1e-4 and greedy decoding picks the same tokens; level 4 quantizes the
activations to int8 per block (several times faster on CPU, about 1e-2 relative error per product).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from rewrite.errors import RewriteError
from rewrite.graph import nf4, quantized

DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
_INPUT, _ATTRIBUTE, _OPTIONAL = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.FormalParameterOption.Optional


def _register_schema() -> None:
    """MatMulNBits' inputs and attributes as ONNX Runtime 1.31 declares them (its inputs A and B named here
    `input` and `packed`: only their order reaches the model)."""
    if onnx.defs.has("MatMulNBits", DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    onnx.defs.register_schema(OpSchema(
        "MatMulNBits", DOMAIN, 1,
        inputs=[_INPUT("input", "T1"), _INPUT("packed", "T2"), _INPUT("scales", "T1"),
                _INPUT("zero_points", "T3", param_option=_OPTIONAL),
                _INPUT("g_idx", "T4", param_option=_OPTIONAL), _INPUT("bias", "T1", param_option=_OPTIONAL)],
        outputs=[_INPUT("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)", *floats], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[_ATTRIBUTE(name, OpSchema.AttrType.INT, "", required=name in ("K", "N", "block_size"))
                    for name in ("K", "N", "bits", "block_size", "accuracy_level")]))


def _register_bnb4_schema() -> None:
    """MatMulBnb4's inputs and attributes as ONNX Runtime 1.31 declares them."""
    if onnx.defs.has("MatMulBnb4", DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    onnx.defs.register_schema(OpSchema(
        "MatMulBnb4", DOMAIN, 1,
        inputs=[_INPUT("input", "T1"), _INPUT("packed", "T2"), _INPUT("absmax", "T1")],
        outputs=[_INPUT("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[_ATTRIBUTE(name, OpSchema.AttrType.INT, "", required=name not in ("transB", "training_mode"))
                    for name in ("K", "N", "block_size", "quant_type", "transB", "training_mode")]))


def _register_gather_schema() -> None:
    """GatherBlockQuantized's inputs and attributes as ONNX Runtime 1.31 declares them (the integer formats only)."""
    if onnx.defs.has("GatherBlockQuantized", DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    onnx.defs.register_schema(OpSchema(
        "GatherBlockQuantized", DOMAIN, 1,
        inputs=[_INPUT("data", "T1"), _INPUT("indices", "Tind"), _INPUT("scales", "T2"),
                _INPUT("zero_points", "T1", param_option=_OPTIONAL)],
        outputs=[_INPUT("output", "T2")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", floats, ""),
                          ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
        attributes=[_ATTRIBUTE(name, OpSchema.AttrType.INT, "", required=False)
                    for name in ("bits", "block_size", "gather_axis", "quantize_axis")]))


def check_accuracy_level(level: int) -> None:
    if level not in ACCURACY_LEVELS or isinstance(level, bool):
        raise RewriteError(f"accuracy level {level!r} is not one of MatMulNBits' "
                           f"{', '.join(map(str, ACCURACY_LEVELS))} (0: fp32, exact; 4: int8 activations, fastest)")


def translations() -> dict:
    """The exporter's `custom_translation_table` entries for the quantized matmuls (MatMulNBits at accuracy level
    0: the exported model is verified against torch as written; `set_accuracy_level` changes it afterwards)."""
    _register_schema()
    _register_bnb4_schema()
    _register_gather_schema()
    microsoft = onnxscript.values.Opset(DOMAIN, 1)

    def matmul_nbits(x, qweight, scales, qzeros, bias, k: int, n: int, bits: int, block_size: int):
        return microsoft.MatMulNBits(x, qweight, scales, qzeros, None, bias, K=k, N=n, bits=bits,
                                     block_size=block_size)

    def matmul_nf4(x, qweight, absmax, qabsmax, offset, bias, k: int, n: int, block_size: int,
                   statistics_block: int):
        if qabsmax is not None:
            absmax = op.Add(op.Mul(op.Gather(_constant(nf4.DYNAMIC.numpy()), op.Cast(qabsmax, to=onnx.TensorProto.INT64)),
                                   op.Gather(absmax, _constant(_groups(n * k, block_size, statistics_block)))), offset)
        y = microsoft.MatMulBnb4(x, qweight, op.CastLike(absmax, x), K=k, N=n, block_size=block_size, quant_type=1)
        return y if bias is None else op.Add(y, bias)

    def gather_nbits(qweight, indices, scales, qzeros, k: int, bits: int, block_size: int):
        vocab, n_blocks = qweight.shape[0], scales.shape[1]
        data = op.Reshape(qweight, _constant(np.array([vocab, n_blocks * block_size * bits // 8], dtype=np.int64)))
        rows = microsoft.GatherBlockQuantized(data, indices, scales, qzeros, bits=bits, block_size=block_size,
                                              gather_axis=0, quantize_axis=1)
        if n_blocks * block_size == k:
            return rows
        return op.Slice(rows, _constant(np.array([0], dtype=np.int64)), _constant(np.array([k], dtype=np.int64)),
                        _constant(np.array([-1], dtype=np.int64)))

    return {quantized.OP: matmul_nbits, nf4.OP: matmul_nf4, quantized.GATHER: gather_nbits}


def _constant(array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(array))


def _groups(weights: int, block_size: int, statistics_block: int) -> np.ndarray:
    """Each block's index into the double quantization's absmaxes."""
    return np.arange(-(-weights // block_size), dtype=np.int64) // statistics_block


def set_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Writes `accuracy_level` on every MatMulNBits node (after verification at level 0); returns how many."""
    nodes = [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == "MatMulNBits"]
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    return len(nodes)
