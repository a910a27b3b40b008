"""Lowering a cached export onto ONNX Runtime's fused ops: each rule against the unfused model in ONNX Runtime
(right-padded prefill and decoding steps, an adapter fed through the slots), and generation of fused models
against Hugging Face's `generate` on several architectures, with the layers a rule cannot lower named."""
from __future__ import annotations

import re
import shutil

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
import torch
import transformers
from click.testing import CliRunner
from onnxscript.optimizer import optimize

import rewrite
from rewrite import runtime
from rewrite.cli.main import cli
from rewrite.errors import RewriteError
from rewrite.export import kv_cache
from rewrite.export.lowering import PREFIXED, lower
from rewrite.export.lowering.activations import fuse_activations
from rewrite.export.lowering.norms import fuse_norms
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.cache import feed, positions
from rewrite.runtime.schema import ModelSchema

from helpers import peft_twin, randomize_lora
from test_kv_cache import GQA, assert_same_generation, byte_tokenizer, hf_generate, tiny_lm

HEAD16 = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2)  # head size 16, 4 heads per KV head
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**GQA, initializer_range=0.2),
    "mistral": lambda: transformers.MistralConfig(**GQA, sliding_window=4, initializer_range=0.2),
    "qwen2": lambda: transformers.Qwen2Config(**HEAD16, initializer_range=0.2),  # q/k/v biases
    "gemma": lambda: transformers.GemmaConfig(**GQA, head_dim=16, initializer_range=0.3),
    "phi3": lambda: transformers.Phi3Config(**GQA, pad_token_id=0, initializer_range=0.2),  # packed qkv_proj
}
LAYER_NORMED = {  # biases and norm parameters drawn at random (Hugging Face starts them at 0 and 1)
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=64, word_embed_proj_dim=64, init_std=0.2),
    "bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.3),
}


def _with_random_vectors(model):
    """`model` with every bias and norm parameter moved off its initial value, so the rules meet real ones."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _saved(arch: str, tmp_path):
    """The tiny model of `arch` and the directory it is saved in."""
    directory = tmp_path / "hf"
    if arch in LAYER_NORMED:
        model = _with_random_vectors(tiny_lm(arch, LAYER_NORMED[arch]()))
    else:
        model = tiny_lm(arch, CONFIGS[arch]())
    model.save_pretrained(directory)
    return model, directory


def _graph(directory, options: dict):
    """The model in `directory`, with a LoRA adapter when it is exported with slots."""
    gm = rewrite.load_pretrained(directory)
    if options.get("adapter_slots"):
        rewrite.apply(gm, "lora", rank=4, alpha=8)
    return gm


def _unfused(directory, tmp_path, **options):
    """The cached export of the model in `directory` without lowering."""
    path = tmp_path / "unfused" / "model.onnx"
    rewrite.export_onnx(_graph(directory, options), path, cache=True, fuse=False, **options)
    return path


def _adapter(path) -> dict[str, np.ndarray]:
    """A random rank-4 adapter for every slot of the model (none without slots)."""
    slots = ModelSchema.read(path).slots
    rng = np.random.default_rng(3)
    return {s.name: (rng.standard_normal([4 if d is None else d for d in s.shape]) * 0.1).astype(np.float32)
            for s in (slots.slots if slots else [])}


def _max_diff(before, after) -> float:
    """Max logit difference of two files of one model over a right-padded batch, an adapter in its slots."""
    prompt, steps = 6, 3
    ids = np.random.default_rng(1).integers(0, 200, (2, prompt + steps))
    mask = np.ones_like(ids)
    mask[1, prompt - 2:prompt] = 0
    extra = _adapter(before)
    outs = [kv_cache._decode(runtime.session(p), ModelSchema.read(p).require_cache(), ids, mask, prompt, extra)
            for p in (before, after)]
    keep = mask.astype(bool)
    return float(np.abs(outs[0][keep] - outs[1][keep]).max())


def _far_diff(before, after, past: int = 1900) -> float:
    """Max logit difference of one decoding step after a random past of `past` positions (rotary angles far out)."""
    layout = ModelSchema.read(before).require_cache()
    rng = np.random.default_rng(2)
    pasts = [rng.standard_normal((1, layout.kv_heads, past, layout.head_dim)).astype(np.float32)
             for _ in layout.past_names()]
    ids, mask = np.array([[5, 7]]), np.ones((1, past + 2), dtype=np.int64)
    outs = [runtime.run(runtime.session(p), feed(ModelSchema.read(p).require_cache(), ids, mask,
                                                 positions(mask)[:, -2:], pasts))["logits"] for p in (before, after)]
    return float(np.abs(outs[0] - outs[1]).max())


def _slot_inputs_used(path) -> bool:
    model = ir.load(path)
    slots = {s.name for s in ModelSchema.read(path).slots.slots}
    return slots <= {v.name for v in model.graph.inputs if v.uses()}


@pytest.fixture(scope="module")
def slotted(tmp_path_factory):
    """The tiny LLaMA's cached export with adapter slots, unfused."""
    tmp = tmp_path_factory.mktemp("slotted")
    directory = tmp / "hf"
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(directory)
    return _unfused(directory, tmp, adapter_slots=True)


def test_norm_rules_fuse_every_norm_and_match_the_unfused_model(slotted, tmp_path):
    model = ir.load(slotted)
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    assert fuse_norms(model) == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4,
                                 "SkipLayerNormalization": 0}
    assert not any(n.op_type in ("Pow", "ReduceMean", "Sqrt", "Reciprocal") for n in model.graph)
    fused = tmp_path / "model.onnx"
    ir.save(model, fused)
    assert _slot_inputs_used(fused)
    assert _max_diff(slotted, fused) <= 1e-5


@pytest.mark.parametrize("arch, skip, plain", [("gpt2", 5, 0), ("bloom", 4, 2)])
def test_layer_norm_and_gelu_rules_fuse_with_the_biases_and_match_the_unfused_model(arch, skip, plain, tmp_path):
    """Residual Add (+ the projection's bias) + LayerNorm -> SkipLayerNormalization (GPT-2's first also adds the
    position embeddings; BLOOM's embedding norm and first input norm have no residual); each family's tanh GELU ->
    FastGelu, BLOOM's bias folded in; adapter slots on every projection."""
    _, directory = _saved(arch, tmp_path)
    unfused = _unfused(directory, tmp_path, adapter_slots=True)
    model = ir.load(unfused)
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    assert fuse_norms(model)["SkipLayerNormalization"] == skip
    assert fuse_activations(model) == {"Gelu": 0, "BiasGelu": 0, "FastGelu": 2}
    ops = [n.op_type for n in model.graph]
    assert ops.count("LayerNormalization") == plain and "Tanh" not in ops and "Pow" not in ops
    assert [len(n.inputs) for n in model.graph if n.op_type == "FastGelu"] == [2 if arch == "bloom" else 1] * 2
    fused = tmp_path / "model.onnx"
    ir.save(model, fused)
    assert _slot_inputs_used(fused)
    assert _max_diff(unfused, fused) <= 1e-5


def test_attention_rule_lowers_every_layer_keeps_the_slots_and_matches_the_unfused_model(slotted, tmp_path):
    fused = tmp_path / "model.onnx"
    shutil.copy(slotted, fused)
    report = lower(fused, None)
    assert report.layers == {0: None, 1: None} and report.fused["GroupQueryAttention"] == 2
    assert report.fused["packed QKV"] == 0  # LoRA slots on q and v: those projections are Adds, kept apart
    # their base MatMuls packed with k's, and gate with up, each layer: the slots read the same input, unpacked
    assert report.fused["packed projections"] == 4
    assert sorted(len(n.outputs) for n in ir.load(fused).graph if n.op_type == "Split") == [2, 2, 3, 3]
    assert report.removed_inputs == ["position_ids"]
    assert not ModelSchema.read(fused).require_cache().position_ids
    after = report.ops_after
    assert after["com.microsoft:GroupQueryAttention"] == 2 and "Concat" not in after and "Expand" not in after
    assert sum(after.values()) < sum(report.ops_before.values()) / 3
    assert _slot_inputs_used(fused)
    assert _max_diff(slotted, fused) <= 1e-5 and _far_diff(slotted, fused) <= 1e-5
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    shutil.copy(slotted, external)
    lower(external, None, external=True)
    assert (external.parent / "model.onnx.data").stat().st_size > external.stat().st_size
    assert _max_diff(slotted, external) <= 1e-5


@pytest.mark.parametrize("arch, rotary, kv_heads, packed", [
    ("gpt2", 0, 4, True), pytest.param("opt", 0, 4, False, marks=pytest.mark.slow),
    pytest.param("phi3", 1, 2, True, marks=pytest.mark.slow)])
def test_attention_rule_lowers_packed_or_unrotated_attention_and_matches_the_unfused_model(arch, rotary, kv_heads,
                                                                                          packed, tmp_path):
    """q/k/v cut in order from one projection (GPT-2's c_attn, Phi-3's qkv_proj) go in packed, the slot staying
    on that projection; GPT-2 merges the heads straight into [tokens, hidden]. Without rotary (GPT-2, OPT, which
    scales q before the product) the op has do_rotary=0, and `position_ids`, which their embeddings still read,
    stays an input; rows are right-padded."""
    model, directory = _saved(arch, tmp_path)
    unfused = _unfused(directory, tmp_path, adapter_slots=True)
    fused = tmp_path / "model.onnx"
    shutil.copy(unfused, fused)
    report = lower(fused, model.config)
    assert report.layers == {0: None, 1: None} and report.removed_inputs == ([] if not rotary else ["position_ids"])
    attention = [n for n in ir.load(fused).graph if n.op_type == "GroupQueryAttention"]
    assert [(n.attributes["do_rotary"].value, n.attributes["kv_num_heads"].value) for n in attention] == [
        (rotary, kv_heads)] * 2
    assert all((n.inputs[1] is None) == packed for n in attention)  # packed: key and value omitted
    assert not {"Softmax", "Expand"} & set(report.ops_after)
    layout = ModelSchema.read(fused).require_cache()
    assert layout.position_ids != bool(rotary) and layout.padding == "right"
    assert _slot_inputs_used(fused)
    assert _max_diff(unfused, fused) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_fused_models_generate_as_hf_generate(arch, tmp_path):
    """Every layer lowered (Mistral's sliding window as the op's local window, Qwen2's biases in the projections,
    Gemma's scaled embeddings and norms); greedy tokens and logits as `generate`'s with left padding."""
    directory = tmp_path / "hf"
    model = tiny_lm(arch, CONFIGS[arch]())
    model.save_pretrained(directory)
    report = rewrite.export_onnx(rewrite.load_pretrained(directory), tmp_path / "model.onnx", cache=True)
    assert report.lowering.layers == {0: None, 1: None}, report.lowering.summary()
    assert "position_ids" not in report.input_names
    assert ModelSchema.read(tmp_path / "model.onnx").require_cache().padding == "right"
    byte_tokenizer().save_pretrained(tmp_path)
    assert_same_generation(tmp_path / "model.onnx", hf_generate(model))


@pytest.mark.slow
@pytest.mark.parametrize("arch, lowered, slots", [("gpt2", True, False), ("opt", True, False), ("bloom", False, False),
                                                  ("bloom", False, True)])
def test_layer_normed_models_generate_as_hf_generate(arch, lowered, slots, tmp_path):
    """GPT-2, OPT and BLOOM with random biases and norms, BLOOM with adapter slots too (a LoRA as exported: its B is
    zero, so the base's tokens; GPT-2's and OPT's slots carry a trained LoRA below): attention lowered where the
    model has no ALiBi, the norms and GPT-2's and BLOOM's GELU fused."""
    model, directory = _saved(arch, tmp_path)
    options = dict(adapter_slots=True) if slots else {}
    report = rewrite.export_onnx(_graph(directory, options), tmp_path / "model.onnx", cache=True, **options)
    lowering = report.lowering
    if lowered:
        assert lowering.layers == {0: None, 1: None}, lowering.summary()
    else:
        assert all("ALiBi" in reason for reason in lowering.layers.values())
    assert lowering.fused["SkipLayerNormalization"] >= 1
    assert ("position_ids" in report.input_names) == (arch != "bloom")  # learned positions; BLOOM's ALiBi has none
    byte_tokenizer().save_pretrained(tmp_path)
    assert_same_generation(tmp_path / "model.onnx", hf_generate(model))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [*CONFIGS, "gpt2", "opt"])
def test_fused_models_with_a_lora_in_their_slots_generate_as_peft(arch, tmp_path):
    """A random LoRA on every default target, exported with adapter slots and fed as an adapter file: every layer
    lowered, the slots on the projections, and greedy tokens and logits as PEFT's model with the same LoRA."""
    _, directory = _saved(arch, tmp_path)  # GPT-2's and OPT's biases and norms random, as above
    gm = rewrite.load_pretrained(directory)
    rewrite.apply(gm, "lora", rank=4, alpha=8)
    randomize_lora(gm)
    targets = sorted({name.split(".lora_")[0].rpartition(".")[2] for name, _ in gm.named_parameters() if ".lora_" in name})
    base = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    reference = peft_twin(base, gm, "causal-lm", r=4, lora_alpha=8, target_modules=targets,
                          fan_in_fan_out=arch == "gpt2")
    path = tmp_path / "model.onnx"
    report = rewrite.export_onnx(gm, path, cache=True, adapter_slots=True)
    assert report.lowering.layers == {0: None, 1: None}, report.lowering.summary()
    assert _slot_inputs_used(path)
    rewrite.save(gm, tmp_path / "lora.pt2")
    adapter = export_adapter(tmp_path / "lora.pt2", tmp_path / "lora.onnx_adapter", path)
    byte_tokenizer().save_pretrained(tmp_path)
    assert_same_generation(path, hf_generate(reference), adapters=Adapters(active=str(adapter)))


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(quantize="int4"), dict(adapter_slots=True)])
def test_fused_llama_quantized_or_slotted_generates_as_its_unfused_export(options, tmp_path):
    directory = tmp_path / "hf"
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(directory)
    unfused = _unfused(directory, tmp_path, **options)
    report = rewrite.export_onnx(_graph(directory, options), tmp_path / "model.onnx", cache=True, **options)
    assert report.lowering.layers == {0: None, 1: None}
    ops = report.lowering.ops_after
    # q/k/v packed (the slotted ones into a MatMul and a Split, their slots beside), and gate with up
    assert ops.get("com.microsoft:MatMulNBits", 0) == (8 if "quantize" in options else 0)
    assert ops["Split"] == (2 if "quantize" in options else 4)
    assert _max_diff(unfused, tmp_path / "model.onnx") <= 1e-5


def test_a_head_size_the_op_cannot_rotate_stays_unlowered_named_and_exact(tmp_path):
    """Head size 8: GroupQueryAttention rotates only heads of a multiple of 16, so the attention stays as exported
    (its norms fused) and the summary names each layer; generation still equals `generate`."""
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=3, initializer_range=0.2)
    directory = tmp_path / "hf"
    model = tiny_lm("llama", config)
    model.save_pretrained(directory)
    report = rewrite.export_onnx(rewrite.load_pretrained(directory), tmp_path / "model.onnx", cache=True)
    lowering = report.lowering
    assert set(lowering.layers) == {0, 1} and all("head size 8" in r for r in lowering.layers.values())
    assert "layer 1 attention not lowered: head size 8" in "\n".join(lowering.summary())
    assert lowering.fused["SkipSimplifiedLayerNormalization"] == 4 and "position_ids" in report.input_names
    byte_tokenizer().save_pretrained(tmp_path)
    assert_same_generation(tmp_path / "model.onnx", hf_generate(model))


def test_a_cache_prefix_is_not_lowered_and_says_so(tmp_path):
    directory = tmp_path / "hf"
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(directory)
    gm = rewrite.load_pretrained(directory)
    rewrite.apply(gm, "prompt", num_virtual_tokens=3)
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", cache=True)
    assert report.lowering.layers == {0: PREFIXED, 1: PREFIXED}
    assert report.lowering.fused["SkipSimplifiedLayerNormalization"] == 4
    assert report.lowering.fused["packed projections"] == 4  # the unlowered q, k and v, and gate with up, each layer
    assert ModelSchema.read(tmp_path / "model.onnx").require_cache().padding == "left"


def test_cli_prints_the_op_counts_and_no_fuse_keeps_the_exported_ops(tmp_path):
    directory = tmp_path / "hf"
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(directory)
    runner = CliRunner()
    result = runner.invoke(cli, ["capture", str(directory), "--task", "causal-lm", "-o", str(tmp_path / "base.pt2")])
    assert result.exit_code == 0, result.output
    outputs = {}
    for name, flags in (("fused", []), ("unfused", ["--no-fuse"])):
        result = runner.invoke(cli, ["export", str(tmp_path / "base.pt2"), "--onnx", str(tmp_path / name / "model.onnx"),
                                     "--with-cache", *flags])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    assert re.search(r"fused ops: \d+ nodes -> \d+ \(1 SimplifiedLayerNormalization, 4 SkipSimplifiedLayerNormalization, "
                     r"2 GroupQueryAttention, 2 packed QKV, 2 packed projections\); attention lowered in 2 of 2 layers",
                     outputs["fused"].replace("\n", " "))
    assert "fused ops" not in outputs["unfused"] and "position_ids" in outputs["unfused"]
    assert _max_diff(tmp_path / "unfused" / "model.onnx", tmp_path / "fused" / "model.onnx") <= 1e-5
    result = runner.invoke(cli, ["export", str(tmp_path / "base.pt2"), "--onnx", str(tmp_path / "plain.onnx"), "--no-fuse"])
    assert isinstance(result.exception, RewriteError) and "--fuse does nothing without --with-cache" in str(result.exception)
