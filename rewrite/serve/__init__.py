"""Serving an exported model: its text encoding read from metadata, prediction, generation with the cache,
and the ONNX Runtime session."""
