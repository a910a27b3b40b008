"""RMSNorm onto ONNX Runtime's `SimplifiedLayerNormalization`, and residual Add + RMSNorm onto
`com.microsoft.SkipSimplifiedLayerNormalization` (whose fourth output, the sum, carries the residual on); residual
Add + LayerNorm (which the exporter already writes as `LayerNormalization`) onto `com.microsoft.SkipLayerNormalization`.

onnxscript's rules, one at a time: its `optimize_for_ort` would also drop the initializers that are graph inputs,
which are the adapter slots' no-adapter defaults. Both ops carry the model's epsilon.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)


def fuse_norms(model: ir.Model) -> dict[str, int]:
    """Fused op -> how many were made (the skip rule consumes the plain ones after a residual Add)."""
    plain = fuse_rms_normalization(model)
    skip = fuse_skip_rms_normalization(model)
    return {"SimplifiedLayerNormalization": plain - skip, "SkipSimplifiedLayerNormalization": skip,
            "SkipLayerNormalization": fuse_skip_layer_normalization(model)}
