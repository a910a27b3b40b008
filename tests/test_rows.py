"""Rows pass: a [CLS]-pooled classifier computes its last block on that row alone, with the same outputs."""
from __future__ import annotations

import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

import rewrite

from helpers import capture_tiny, fresh_inputs, logits, randomize_lora


def _flops(gm, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gm(**inputs)
    return counter.get_total_flops()


def test_cls_pooled_classifier_keeps_its_outputs_and_costs_less(make_tiny, tmp_path):
    model = make_tiny("bert", "seq-cls")
    gm = capture_tiny(model)
    inputs = fresh_inputs()
    before, cost = logits(gm, inputs), _flops(gm, inputs)
    rewrite.apply(gm, "rows")
    assert gm.info.history[-1]["report"]["moved"] > 10
    torch.testing.assert_close(logits(gm, inputs), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), atol=1e-6, rtol=0)
    assert _flops(gm, inputs) < cost
    rewrite.apply(gm, "lora", rank=4, roles=["q", "k", "v", "o", "mlp"])
    randomize_lora(gm)
    with_lora = logits(gm, inputs)
    rewrite.apply(gm, "fold")
    torch.testing.assert_close(logits(gm, inputs), with_lora, atol=1e-5, rtol=0)
    assert rewrite.export_onnx(gm, tmp_path / "rows.onnx").max_abs_diff <= 1e-4


def test_trains_in_train_mode(make_tiny):
    gm = capture_tiny(make_tiny("bert", "seq-cls"))
    rewrite.apply(gm, "rows")
    rewrite.apply(gm, "lora", rank=4)
    gm.train()
    loss = gm(**fresh_inputs()).logits.sum()
    loss.backward()
    assert all(p.grad is not None for n, p in gm.named_parameters() if p.requires_grad)


def test_a_graph_without_a_one_position_read_is_unchanged(make_tiny, caplog):
    gm = capture_tiny(make_tiny("llama", "causal-lm"))
    nodes = len(gm.graph.nodes)
    with caplog.at_level(logging.WARNING, logger="rewrite"):
        rewrite.apply(gm, "rows")
    assert "reads no hidden states at a single position" in caplog.text
    assert len(gm.graph.nodes) == nodes
