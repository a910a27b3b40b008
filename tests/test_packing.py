"""Packed q/k/v projections under the lowered attention: one MatMul (or MatMulNBits) per layer where the three
projections allow, the same logits as the unfused export in ONNX Runtime (projections carrying adapter slots stay
apart: `test_lowering`'s slotted model)."""
from __future__ import annotations

import collections

import onnx_ir as ir
import pytest
import transformers

import rewrite

from test_kv_cache import GQA, tiny_lm
from test_lowering import HEAD16, _graph, _max_diff, _unfused

CASES = {
    "llama": (lambda: transformers.LlamaConfig(**GQA, initializer_range=0.2), {}),
    "llama-int4": (lambda: transformers.LlamaConfig(**GQA, initializer_range=0.2), dict(quantize="int4")),
    "qwen2": (lambda: transformers.Qwen2Config(**HEAD16, initializer_range=0.2), {}),  # q/k/v biases packed too
}


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in ir.load(path).graph)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c != "llama" else c for c in CASES])
def test_every_layer_packs_its_projections_and_matches_the_unfused_model(case, tmp_path):
    config, options = CASES[case]
    directory = tmp_path / "hf"
    tiny_lm(case.split("-")[0], config()).save_pretrained(directory)
    unfused = _unfused(directory, tmp_path, **options)
    fused = tmp_path / "model.onnx"
    report = rewrite.export_onnx(_graph(directory, options), fused, cache=True, **options)
    assert report.lowering.fused["packed QKV"] == 2 and report.lowering.fused["packed projections"] == 2
    ops = _ops(fused)
    assert ops["MatMul"] + ops["MatMulNBits"] == 2 * 4 + 1  # per layer: packed q/k/v, o, packed gate/up, down; the head
    assert ops["MatMulNBits"] == (8 if options else 0) and ops["Split"] == 2
    assert _max_diff(unfused, fused) <= 1e-5
