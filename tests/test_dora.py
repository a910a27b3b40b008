"""DoRA pass: PEFT's `use_dora` LoRA on LLaMA (Linear), GPT-2 (Conv1D, `[in, out]` weights) and BERT (Linear
with bias): outputs, gradients (the norm detached) and trainable counts equal PEFT's in eval and in train mode
with dropout, adapter files both ways, the fold equal to `merge_and_unload`, and ONNX adapter slots."""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import rewrite
from rewrite import runtime
from rewrite.export.onnx import real_positions
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters
from rewrite.graph.params import count_parameters
from rewrite.graph.synthetic_inputs import example_inputs

from conftest import tiny_config
from helpers import TASK_TYPES, assert_folds_to, capture_tiny, fresh_inputs, logits, randomize_lora, sentiment_rows

ARCHS = [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "seq-cls")]
MAGNITUDE = ".lora_magnitude_vector"


def peft_key(name: str) -> str:
    """PEFT's parameter name for one of the graph's DoRA tensors."""
    name = name + ".weight" if name.endswith(MAGNITUDE) else name
    return "base_model.model." + name.replace(".weight", ".default.weight")


def dora_twin(model, gm, task: str, **config):
    """PEFT's DoRA model over a copy of `model` carrying `gm`'s A, B and magnitudes."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type=TASK_TYPES[task], use_dora=True, **config))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                params[peft_key(name)].copy_(param)
    return peft_model.eval()


def dora_graph(model, seed: int = 1, **options):
    gm = capture_tiny(model)
    rewrite.apply(gm, "dora", rank=4, alpha=8, **options)
    randomize_lora(gm, seed)  # A, B and the magnitudes
    return gm


def targets(gm) -> list[str]:
    return gm.info.history[-1]["report"]["targets"]


@pytest.mark.parametrize("arch,task", ARCHS)
def test_outputs_counts_and_targets_equal_peft(make_tiny, arch, task):
    model = make_tiny(arch, task)
    gm = dora_graph(model)
    reference = dora_twin(model, gm, task, r=4, lora_alpha=8)
    adapted = {name.removeprefix("base_model.model.").removesuffix(MAGNITUDE)
               for name, _ in reference.named_modules() if name.endswith(MAGNITUDE)}
    assert set(targets(gm)) == adapted
    assert count_parameters(gm)[0] == reference.get_nb_trainable_parameters()[0]
    inputs = fresh_inputs()
    expected = logits(reference, inputs)
    torch.testing.assert_close(logits(gm.eval(), inputs), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, inputs), expected, atol=1e-4, rtol=0), "the adapter changes the outputs"


@pytest.mark.parametrize("arch,task", ARCHS)
def test_untrained_dora_is_the_base_model_with_peft_magnitudes(make_tiny, arch, task):
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "dora", rank=4, alpha=8)
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(task_type=TASK_TYPES[task], r=4, lora_alpha=8,
                                                                use_dora=True))
    for path in targets(gm):
        torch.testing.assert_close(gm.get_parameter(path + MAGNITUDE),
                                   reference.get_parameter(peft_key(path + MAGNITUDE)), atol=0, rtol=0)
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(model, inputs), atol=1e-5, rtol=0)


def no_dropout_gpt2():
    torch.manual_seed(0)
    config = tiny_config("gpt2")
    config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_train_mode_outputs_and_gradients_equal_peft(make_tiny, arch, dropout):
    """PEFT's training form with dropout recomputes the base matmul on the dropped input, and no gradient flows
    through the norm: the same dropout mask (same seed) gives the same logits and A, B and magnitude gradients."""
    model = no_dropout_gpt2() if arch == "gpt2" else make_tiny(arch)
    gm = dora_graph(model, dropout=dropout)
    reference = dora_twin(model, gm, "causal-lm", r=4, lora_alpha=8, lora_dropout=dropout)
    inputs = fresh_inputs()
    upstream = torch.randn(logits(model, inputs).shape, generator=torch.Generator().manual_seed(9))
    outputs = []
    for module in (gm.train(), reference.train()):
        torch.manual_seed(0)
        out = module(**inputs).logits
        (out * upstream).sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    params = dict(reference.named_parameters())
    trained = [(name, p) for name, p in gm.named_parameters() if p.requires_grad]
    assert {name.rpartition(".")[2] for name, _ in trained} == {"weight", "lora_magnitude_vector"}
    for name, param in trained:
        torch.testing.assert_close(param.grad, params[peft_key(name)].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,task", ARCHS)
def test_fold_equals_merge_and_unload_and_restores_the_base_graph(make_tiny, arch, task):
    model = make_tiny(arch, task)
    base = capture_tiny(model)
    gm = dora_graph(model, roles=["q", "k", "v", "o", "mlp"])
    merged = dora_twin(model, gm, task, r=4, lora_alpha=8, target_modules=targets(gm)).merge_and_unload()
    assert_folds_to(gm, merged, base)


@pytest.mark.parametrize("arch,task", ARCHS)
def test_saved_adapter_loads_in_peft(make_tiny, tmp_path, arch, task):
    model = make_tiny(arch, task)
    gm = dora_graph(model, rank_pattern={"1": 2} if arch == "llama" else {})
    rewrite.save_adapter(gm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    keys = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {f"base_model.model.{path}{MAGNITUDE}" for path in targets(gm)} <= set(keys)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(peft_model, inputs), atol=1e-5, rtol=0)


def peft_dora_adapter(model, task, directory, **config):
    """A PEFT-saved DoRA adapter with trained-looking A, B, magnitudes (and head)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type=TASK_TYPES[task], use_dora=True, **config))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory)
    return peft_model.eval()


@pytest.mark.parametrize("arch,task,config", [
    ("llama", "causal-lm", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True)),
    ("gpt2", "causal-lm", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])),
    ("bert", "seq-cls", dict(r=2, lora_alpha=4, target_modules="all-linear")),
])
def test_peft_adapter_loads_as_dora(make_tiny, tmp_path, arch, task, config):
    model = make_tiny(arch, task)
    peft_model = peft_dora_adapter(model, task, tmp_path / "peft", **config)
    gm = rewrite.load_adapter(capture_tiny(model), tmp_path / "peft")
    assert gm.info.history[-1]["pass"] == "dora"
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(gm.eval(), inputs), logits(peft_model, inputs), atol=1e-5, rtol=0)


def test_a_dora_file_without_magnitudes_is_refused(make_tiny, tmp_path):
    """PEFT only warns and keeps `‖W0‖`, which is not the adapter's magnitude."""
    model = make_tiny("llama")
    peft_dora_adapter(model, "causal-lm", tmp_path / "peft", r=4, lora_alpha=8)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.endswith(MAGNITUDE)}, weights)
    with pytest.raises(rewrite.RewriteError, match=r"has no weight for model\.layers\.0\.self_attn\.q_proj\."
                                                   r"lora_magnitude_vector; it does not fit this graph"):
        rewrite.load_adapter(capture_tiny(model), tmp_path / "peft")


def test_a_peft_dora_adapter_on_an_embedding_is_refused(make_tiny, tmp_path):
    model = make_tiny("llama")
    peft_dora_adapter(model, "causal-lm", tmp_path / "peft", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    with pytest.raises(rewrite.RewriteError, match=r"^DoRA on the embedding model\.embed_tokens is not supported; "
                                                   r"put LoRA on it, or target linear modules with DoRA$"):
        rewrite.load_adapter(capture_tiny(model), tmp_path / "peft")


def run_onnx(path, inputs, adapter=None):
    feeds, options, _loaded = Adapters(active=adapter).run_inputs(path, len(inputs["input_ids"]))
    return torch.as_tensor(runtime.run(runtime.session(path), inputs | feeds, options)["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("gpt2", "causal-lm")])
def test_onnx_slots_serve_peft_dora_adapters_and_refuse_mixed_batches(make_tiny, tmp_path, arch, task):
    """A, B (carrying s) and the magnitude are slots; with none filled, the magnitude is `‖W0‖` and the model is
    the base; with a PEFT DoRA adapter, PEFT's outputs."""
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    rewrite.apply(gm, "dora", rank=4, alpha=8)
    rewrite.export_onnx(gm, tmp_path / "slots.onnx", adapter_slots=True)
    peft_model = peft_dora_adapter(model, task, tmp_path / "peft", r=6, lora_alpha=9)
    file = export_adapter(tmp_path / "peft", tmp_path / "a.onnx_adapter", tmp_path / "slots.onnx")
    inputs = fresh_inputs()
    for expected, got in [(logits(model, inputs), run_onnx(tmp_path / "slots.onnx", inputs)),
                          (logits(peft_model, inputs), run_onnx(tmp_path / "slots.onnx", inputs, str(file)))]:
        torch.testing.assert_close(*real_positions(expected, got, inputs), atol=1e-4, rtol=0)
    with pytest.raises(rewrite.RewriteError, match=r"^DoRA adapters cannot be mixed per row: .* serve one adapter "
                                                   r"per call$"):
        rewrite.export_onnx(gm, tmp_path / "mixed.onnx", mixed_adapters=True)


@pytest.mark.slow
def test_training_through_the_speed_passes_equals_plain_training_and_the_archive_keeps_it(no_dropout_dir, tmp_path):
    """The speed passes (fused and recomputed A projections, ...) leave DoRA's steps as they are: A, B and the
    magnitudes move exactly as without them; the saved graph reloads with the same outputs."""
    trained = []
    for speed in (None, []):
        torch.manual_seed(0)
        gm = rewrite.load_pretrained(no_dropout_dir, task="seq-cls", num_labels=2)
        rewrite.apply(gm, "dora", rank=4, alpha=8, roles=["q", "k", "v", "mlp"])
        before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
        config = rewrite.TrainConfig(max_steps=3, batch_size=8, lr=1e-2, progress=False, speed_passes=speed)
        rewrite.train(gm, sentiment_rows(32, seed=0), config=config)
        after = {n: p.detach() for n, p in gm.named_parameters() if n in before}
        assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith(MAGNITUDE))
        trained.append(after)
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], atol=1e-5, rtol=1e-4)
    rewrite.save(gm, tmp_path / "dora.pt2")
    inputs = example_inputs(gm.info.input_names, 1000, batch=3, seq=11, seed=5, pad=True)
    torch.testing.assert_close(logits(rewrite.load(tmp_path / "dora.pt2").eval(), inputs), logits(gm.eval(), inputs),
                               atol=0, rtol=0)
