"""GELU onto ONNX Runtime's `com.microsoft.Gelu` (erf form) and `com.microsoft.FastGelu` (tanh form), the
projection's bias folded into the op where an Add of a constant vector precedes it.

onnxscript's rules cover the erf form; the tanh form is written by each model family its own way (GPT-2's
`0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3)))`, BLOOM's `x * 0.5 * (1 + tanh(c * x * (1 + 0.044715 * x * x)))`),
so those two are matched here as the exporter writes them. FastGelu computes the same function.
"""
from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _tanh_gelu(op, x, inner):
    """`0.5 * x * (1 + tanh(inner))` as both families write it (the half taken of x first)."""
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))


class GPT2Gelu(pattern.RewriteRuleClassBase):
    """Hugging Face's `gelu_new` (GPT-2, GPT-J, ...) -> FastGelu."""

    def pattern(self, op, x):
        cubic = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
        return _tanh_gelu(op, x, op.Mul(cubic, SQRT_2_OVER_PI))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain="com.microsoft")


class BloomGelu(pattern.RewriteRuleClassBase):
    """BLOOM's `bloom_gelu_forward` -> FastGelu."""

    def pattern(self, op, x):
        cubic = op.Add(op.Mul(op.Mul(x, 0.044715), x), 1.0)
        return _tanh_gelu(op, x, op.Mul(op.Mul(x, SQRT_2_OVER_PI), cubic))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain="com.microsoft")


class FastGeluBias(pattern.RewriteRuleClassBase):
    """`FastGelu(x + bias)` -> `FastGelu(x, bias)`: the projection's bias added inside the op."""

    def pattern(self, op, x, bias):
        return op.FastGelu(op.Add(x, bias), _domain="com.microsoft")

    def check(self, context, x, bias, **_):
        result = pattern.MatchResult()
        if bias.const_value is None or not _ir_utils.has_rank(bias, 1):
            return result.fail("the added value is not a constant vector", bias)
        return result

    def rewrite(self, op, x, bias):
        return op.FastGelu(x, bias, _domain="com.microsoft")


TANH_RULES = pattern.RewriteRuleSet([GPT2Gelu.rule(), BloomGelu.rule()])
BIAS_RULES = pattern.RewriteRuleSet([FastGeluBias.rule()])


FUSED = ("Gelu", "BiasGelu", "FastGelu")


def fuse_activations(model: ir.Model) -> dict[str, int]:
    """Fused op -> how many the model has after the rules."""
    fuse_erfgelu(model)
    fuse_gelu(model)
    TANH_RULES.apply_to_model(model)
    BIAS_RULES.apply_to_model(model)
    fuse_bias_gelu(model)
    made = [n.op_type for n in model.graph if n.domain == "com.microsoft" and n.op_type in FUSED]
    return {name: made.count(name) for name in FUSED}
