"""PEFT adapter files: ours load in PEFT, PEFT's load in ours, with the same outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rewrite

from helpers import capture_tiny, fresh_inputs, logits, randomize_lora


@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "seq-cls")])
def test_saved_adapter_loads_in_peft(make_tiny, tmp_path, arch, task):
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "lora", rank=4, alpha=16, rank_pattern={"1": 2} if arch == "llama" else {})
    randomize_lora(gm)
    rewrite.save_adapter(gm, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(peft_model, inputs), atol=1e-5, rtol=0)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("arch,task,config", [
    ("llama", "causal-lm", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_rslora=True)),
    ("bert", "seq-cls", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    ("gpt_neox", "causal-lm", dict(r=3, lora_alpha=6, target_modules=["query_key_value", "dense"], layers_to_transform=[0])),
])
def test_peft_adapter_loads_in_ours(make_tiny, tmp_path, arch, task, config):
    model = make_tiny(arch, task)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type={"seq-cls": "SEQ_CLS"}.get(task), **config))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = rewrite.load_adapter(capture_tiny(model), tmp_path / "peft")
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(peft_model.eval(), inputs), atol=1e-5, rtol=0)


def test_adapter_for_another_shape_is_refused(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=4)
    rewrite.save_adapter(gm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["r"] = 2
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(rewrite.RewriteError, match=r"has shape \(4, 64\) but this graph needs \(2, 64\)"):
        rewrite.load_adapter(capture_tiny(make_tiny("llama")), tmp_path / "adapter")


def test_truncated_adapter_is_a_clear_error(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=4)
    rewrite.save_adapter(gm, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(rewrite.RewriteError, match="is not a readable safetensors file"):
        rewrite.load_adapter(capture_tiny(make_tiny("llama")), tmp_path / "adapter")


def test_saving_without_lora_is_a_clear_error(make_tiny, tmp_path):
    with pytest.raises(rewrite.RewriteError, match="the graph has no adapter to save"):
        rewrite.save_adapter(capture_tiny(make_tiny("llama")), tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()
