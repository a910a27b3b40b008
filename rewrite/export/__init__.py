"""Export to ONNX: the graph as an ONNX model, its KV-cache form, and adapter slots as ONNX inputs and
`.onnx_adapter` files."""
