"""PEFT prompt-learning adapters: PEFT-saved PROMPT_TUNING and P_TUNING adapters load as prepended
prompts with PEFT's outputs; what we save, PEFT loads with our outputs; and what cannot be saved says so."""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import rewrite
from rewrite.errors import RewriteError
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.adapters.prompt_table import TABLE

BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
LLAMA_INPUTS = ["input_ids", "attention_mask"]
CASES = [("llama", "causal-lm", "CAUSAL_LM", LLAMA_INPUTS), ("bert", "seq-cls", "SEQ_CLS", BERT_INPUTS)]


def capture(model, names):
    return rewrite.capture(copy.deepcopy(model), example_inputs(names, 128))


def fresh(names):
    return example_inputs(names, 128, batch=3, seq=11, seed=5, pad=True)


def randomize(module, seed: int) -> None:
    """Trained-looking values for every trainable tensor (PEFT inits the seq-cls head's copy as the head)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))


def logits(module, inputs):
    with torch.no_grad():
        return module(**inputs).logits


@pytest.mark.parametrize("arch,task,task_type,names", CASES)
def test_a_peft_saved_prompt_tuning_adapter_reproduces_peft(make_tiny, tmp_path, arch, task, task_type, names):
    model = make_tiny(arch, task)
    peft_model = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=task_type, num_virtual_tokens=6))
    randomize(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path)
    gm = capture(model, names)
    rewrite.load_adapter(gm, tmp_path)
    torch.testing.assert_close(logits(gm, fresh(names)), logits(peft_model.eval(), fresh(names)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_a_peft_p_tuning_adapter_loads_as_prepended_prompts(make_tiny, tmp_path, encoder):
    model = make_tiny("bert", "seq-cls")
    config = PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16,
                                 encoder_reparameterization_type=encoder)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    randomize(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path)
    gm = capture(model, BERT_INPUTS)
    rewrite.load_adapter(gm, tmp_path)
    assert gm.info.history[-1]["pass"] == "prompt"
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(logits(gm, fresh(BERT_INPUTS)), logits(peft_model.eval(), fresh(BERT_INPUTS)),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(gm, fresh(BERT_INPUTS)), logits(loaded, fresh(BERT_INPUTS)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,task,task_type,names", CASES)
def test_peft_loads_what_we_save(make_tiny, tmp_path, arch, task, task_type, names):
    model = make_tiny(arch, task)
    gm = capture(model, names)
    rewrite.apply(gm, "prompt", num_virtual_tokens=6)
    randomize(gm, seed=5)
    rewrite.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"]) == ("PROMPT_TUNING", task_type, 6)
    weights = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    head = ["base_model.classifier.bias", "base_model.classifier.weight"] if task == "seq-cls" else []
    assert sorted(weights) == [*head, "prompt_embeddings"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(logits(gm, fresh(names)), logits(loaded, fresh(names)), rtol=0, atol=1e-5)


def test_what_peft_cannot_hold_is_refused(make_tiny, tmp_path):
    model = make_tiny("bert", "masked-lm")
    ptuned = capture(model, BERT_INPUTS)
    rewrite.apply(ptuned, "ptuning", template="[P] {text} [P] [MASK] .", encoder="mlp")
    with pytest.raises(RewriteError, match="P-tuning puts prompts at template positions"):
        rewrite.save_adapter(ptuned, tmp_path / "ptuning")
    both = capture(model, BERT_INPUTS)
    rewrite.Pipeline(["prompt", "lora"]).run(both)
    with pytest.raises(RewriteError, match="holds either LoRA or prompt tuning, and this graph has both"):
        rewrite.save_adapter(both, tmp_path / "both")


def test_a_prompt_adapter_for_another_model_is_refused_before_the_graph_changes(make_tiny, tmp_path):
    model = make_tiny("llama", "causal-lm")
    gm = capture(model, LLAMA_INPUTS)
    rewrite.apply(gm, "prompt", num_virtual_tokens=6)
    rewrite.save_adapter(gm, tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    target = capture(model, LLAMA_INPUTS)
    safetensors.torch.save_file({"prompt_embeddings": weights["prompt_embeddings"][:, :32].contiguous()},
                                tmp_path / "adapter_model.safetensors")
    with pytest.raises(RewriteError, match=r"holds prompts of shape \(6, 32\) but this model's embeddings are 64 wide"):
        rewrite.load_adapter(target, tmp_path)
    safetensors.torch.save_file({"other": weights["prompt_embeddings"]}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(RewriteError, match="has no prompt_embeddings tensor"):
        rewrite.load_adapter(target, tmp_path)
    assert target.info.history == [] and TABLE not in dict(target.named_parameters())
