"""The real pretrained checkpoint (MiniLM-L6, offline): LoRA, fold and ONNX against PEFT and ONNX Runtime."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

import rewrite
from rewrite.graph.params import trainable_parameters_line

from helpers import peft_twin, randomize_lora

pytestmark = pytest.mark.slow


def test_minilm_lora_fold_and_onnx_match_peft(minilm_dir, tmp_path):
    gm = rewrite.load_pretrained(minilm_dir)
    assert gm.info.task == "feature-extraction"
    rewrite.apply(gm, "lora", rank=8, alpha=16)
    randomize_lora(gm)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    reference = peft_twin(model, gm, "feature-extraction", r=8, lora_alpha=16, target_modules=["query", "value"])
    assert trainable_parameters_line(gm).startswith("trainable params: 73,728 || all params: 22,786,944")
    encoded = gm.info.tokenizer(["a charming and often affecting journey", "bad"], padding=True, return_tensors="pt")
    hidden = lambda module: module(**encoded).last_hidden_state  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(hidden(gm.eval()), hidden(reference), atol=1e-5, rtol=0)
        merged = reference.merge_and_unload()
        rewrite.apply(gm, "fold")
        torch.testing.assert_close(hidden(gm), hidden(merged), atol=1e-5, rtol=0)
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.output_names == ["last_hidden_state", "pooler_output"] and report.max_abs_diff <= report.tolerance
