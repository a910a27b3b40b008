"""Export to ONNX: the graph as an ONNX model, its KV-cache form, adapter slots as ONNX inputs and
`.onnx_adapter` files, and the ONNX Runtime session that verifies and runs them."""
