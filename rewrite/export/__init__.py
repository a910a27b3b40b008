"""Export to ONNX: the graph as an ONNX model (float, fp16, or with int4/int8 MatMulNBits weights, quantized
after training if asked), its KV-cache form, adapter slots as ONNX inputs and `.onnx_adapter` files, and the
ONNX Runtime session that verifies and runs them."""
