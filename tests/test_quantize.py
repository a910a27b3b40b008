"""Weight-only quantization: packing byte-equal to ONNX Runtime's own quantizer, dequantization bit-equal to its
MatMulNBits kernel, quantized graphs equal to ONNX Runtime on four architectures, LoRA over a quantized base,
archives, and the refusals."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import matmul_nbits_quantizer as mnq

import rewrite
from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.query import GraphQuery

from helpers import capture_tiny, fresh_inputs, logits


def ort_quantizer(weight: torch.Tensor, bits: int, block: int, symmetric: bool):
    """ONNX Runtime's quantizer (default config) over one MatMul by `weight.T`: its model and B, scales, zero points."""
    n, k = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(weight.T.contiguous().numpy(), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric)
    quantizer.process()
    model = quantizer.model.model
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, tensors[node.input[1]], tensors[node.input[2]], tensors[node.input[3]] if len(node.input) > 3 else None


def ort_weight(model, k: int) -> np.ndarray:
    """The weight `[N, K]` ONNX Runtime's kernel multiplies by (accuracy level 0), read exactly: `eye(K) @ W`.
    -0.0 comes back as +0.0, so zeros are compared without their sign."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"X": np.eye(k, dtype=np.float32)})[0].T


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = (np.where(t == 0, np.float32(0), t).astype(np.float32) for t in (a, b))
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


CASES = [(bits, symmetric, block, k) for bits in (4, 8) for symmetric in (False, True)
         for block, k in ((32, 96), (16, 33), (64, 200), (128, 128), (256, 300))]


@pytest.mark.parametrize("bits,symmetric,block,k", CASES)
def test_packing_is_onnx_runtimes_byte_for_byte_and_dequant_its_kernel_bit_for_bit(bits, symmetric, block, k):
    torch.manual_seed(k + block)
    weight = torch.randn(24, k) * 0.05
    weight[0, :5] = 0.0  # an all-zero start and exact zeros
    model, qweight, scales, qzeros = ort_quantizer(weight, bits, block, symmetric)
    packed = quantized.quantize(weight, bits, block, symmetric)

    if bits == 4 and k % 2:  # MLAS leaves a stale value in the nibble after an odd K, which its kernel never reads
        qweight = qweight.copy()
        qweight.reshape(24, -1)[:, k // 2] &= 0x0F
    assert np.array_equal(packed.qweight.numpy(), qweight)
    assert np.array_equal(packed.scales.numpy().view(np.uint32), scales.view(np.uint32))
    assert (packed.qzeros is None) == (qzeros is None) == symmetric
    assert qzeros is None or np.array_equal(packed.qzeros.numpy(), qzeros)
    ours = quantized.dequantize(packed.qweight, packed.scales, packed.qzeros, k, bits).numpy()
    assert same_bits(ours, ort_weight(model, k))
