"""NF4 (QLoRA's format): packing byte-equal to bitsandbytes' `quantize_4bit` (double quantization included),
dequantization bit-equal to its `dequantize_4bit`, a LoRA graph over an NF4 base equal to PEFT over bitsandbytes'
`Linear4bit`, training, archives, the `MatMulBnb4` export against ONNX Runtime, and the refusals."""
from __future__ import annotations

import re

import bitsandbytes as bnb
import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers

import rewrite
import rewrite.passes
from rewrite.cli.main import main
from rewrite.errors import RewriteError
from rewrite.export.onnx import real_positions
from rewrite.graph import nf4, quantized

from conftest import tiny_model
from helpers import capture_tiny, copy_lora, fresh_inputs, logits, randomize_lora
from test_quantize import SLOW, onnx_tensors, train_steps

F = bnb.functional


def nf4_graph(arch: str, **options):
    gm = capture_tiny(tiny_model(arch))
    rewrite.apply(gm, "quantize", dtype="nf4", **options)
    return gm


def test_code_books_are_bitsandbytes():
    assert torch.equal(nf4.CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC, F.create_dynamic_map(signed=True))


# shapes with a partial last block, an odd weight count, and statistics that fill several blocks of 256 or a part
CASES = [((48, 128), 64, False), ((64, 512), 64, True), ((32, 256), 128, True), ((32, 256), 128, False),
         ((300, 520), 64, True), ((7, 9), 32, True), ((3, 50), 32, False), ((256, 1024), 32, True)]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("shape,block,double_quant", CASES)
def test_packing_is_bitsandbytes_byte_for_byte_and_dequant_its_bit_for_bit(shape, block, double_quant, chunked,
                                                                            monkeypatch):
    """Chunked: a large weight is quantized a few blocks at a time (here three), with the same bytes."""
    if chunked:
        monkeypatch.setattr(nf4, "CHUNK", 3 * block)
    torch.manual_seed(shape[0] + block)
    weight = torch.randn(*shape) * 0.05
    packed_ref, state = F.quantize_4bit(weight, blocksize=block, quant_type="nf4", compress_statistics=double_quant)
    packed = nf4.quantize(weight, block, double_quant)

    assert torch.equal(packed.qweight, packed_ref.view(-1))
    if double_quant:
        assert torch.equal(packed.qabsmax, state.absmax) and torch.equal(packed.absmax, state.state2.absmax)
        assert torch.equal(packed.offset, state.offset) and state.state2.blocksize == nf4.STATISTICS_BLOCK
    else:
        assert torch.equal(packed.absmax, state.absmax) and packed.qabsmax is None and packed.offset is None
    ours = nf4.dequantize(packed.qweight, packed.absmax, packed.qabsmax, packed.offset, shape[1], shape[0], block)
    assert torch.equal(ours, F.dequantize_4bit(packed_ref, state))


def bnb_weight(weight: torch.Tensor, block: int = nf4.DEFAULT_BLOCK_SIZE, double_quant: bool = True) -> torch.Tensor:
    return F.dequantize_4bit(*F.quantize_4bit(weight, blocksize=block, quant_type="nf4",
                                              compress_statistics=double_quant))


@pytest.mark.parametrize("arch,options", [("llama", {}), ("gpt2", {"double_quant": False}),
                                          ("qwen2", {"block_size": 32})])
def test_every_projection_multiplies_by_bitsandbytes_dequantized_weight(arch, options):
    """GPT-2's Conv1D weights `[in, out]` are quantized as the `[out, in]` a Linear4bit holds. (bitsandbytes' CPU
    `dequantize_4bit` disagrees with its own quantizer when a block spans rows, `in % block != 0`: tiny widths
    keep to blocks that divide them.)"""
    model, gm = tiny_model(arch), nf4_graph(arch, **options)
    modules = dict(model.named_modules())
    nodes = [n for n in gm.graph.nodes if quantized.is_quantized(n)]

    assert len(nodes) == len(gm.info.history[-1]["report"]["modules"]) == (8 if arch == "gpt2" else 14)
    for node in nodes:
        owner = node.args[1].target.rpartition(".")[0]
        weight = modules[owner].weight.detach()
        expected = bnb_weight(weight.T.contiguous() if arch == "gpt2" else weight, options.get("block_size", 64),
                              options.get("double_quant", True))
        assert torch.equal(quantized.dequantized_weight(gm, node), expected), owner


def test_fill_quantizes_a_new_weight_in_the_nodes_format():
    gm = nf4_graph("llama", block_size=32)
    node = next(n for n in gm.graph.nodes if quantized.is_quantized(n))
    k, n = quantized.features(node)
    weight = torch.randn(n, k)
    quantized.fill(gm, node, weight)

    assert quantized.format_of(node) == quantized.Format("nf4", 32, double_quant=True)
    assert torch.equal(quantized.dequantized_weight(gm, node), bnb_weight(weight, 32))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nf4-llama")
    tiny_model("llama").save_pretrained(directory)
    return directory


def peft_linear4bit(directory, gm):
    """transformers' QLoRA load (NF4, double quantization, fp32 compute) with PEFT's LoRA on q and v carrying
    `gm`'s LoRA weights, in training mode (no dropout anywhere): in eval mode, on a CPU with AVX512-BF16,
    `Linear4bit` repacks its weights and multiplies in bf16 (about 7e-3 off its own fp32 dequantization)."""
    import peft

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu",
                                                             dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    return copy_lora(gm, model).train()


def test_lora_over_an_nf4_llama_equals_peft_over_bitsandbytes_linear4bit(tiny_llama_dir):
    gm = rewrite.load_pretrained(tiny_llama_dir)
    rewrite.apply(gm, "quantize", dtype="nf4")
    rewrite.apply(gm, "lora", rank=8)
    randomize_lora(gm)
    reference = peft_linear4bit(tiny_llama_dir, gm)
    linear4bit = [m for m in reference.modules() if isinstance(m, bnb.nn.Linear4bit)]
    inputs = fresh_inputs()

    assert len(linear4bit) == 14 and {m.weight.quant_state.nested for m in linear4bit} == {True}
    assert reference.get_nb_trainable_parameters()[0] == sum(p.numel() for p in gm.parameters() if p.requires_grad)
    expected, got = real_positions(logits(reference, inputs), logits(gm.eval(), inputs), inputs)
    assert (got - expected).abs().max() <= 1e-5


def test_lora_over_nf4_trains_only_its_branches_and_round_trips_the_archive(tmp_path):
    gm = nf4_graph("llama")
    rewrite.apply(gm, "lora", rank=8)
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    losses = train_steps(gm)

    assert losses[-1] < losses[0]
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.{m}.lora_{f}.weight" for i in (0, 1) for m in ("q_proj", "v_proj") for f in "AB"}
    assert all(torch.equal(b, buffers[name]) for name, b in gm.named_buffers())
    rewrite.save(gm, tmp_path / "graph.pt2")
    loaded = rewrite.load(tmp_path / "graph.pt2")
    inputs = fresh_inputs(seed=3)
    torch.testing.assert_close(logits(loaded.eval(), inputs), logits(gm.eval(), inputs), rtol=0, atol=0)


def test_the_nf4_op_computes_gradients_for_the_input_and_a_trained_bias_only():
    weight, bias = torch.randn(24, 64), torch.randn(24, requires_grad=True)
    packed = nf4.quantize(weight, 32, True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = nf4.matmul_nf4(x, packed.qweight, packed.absmax, packed.qabsmax, packed.offset, bias, 64, 24, 32, 256)
    y.square().sum().backward()
    dense = bnb_weight(weight, 32)
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, dense, bias_ref).square().sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,options", [("llama", {}), pytest.param("gpt2", {"double_quant": False}, marks=SLOW)])
def test_nf4_graphs_export_one_matmulbnb4_per_projection_equal_to_torch(arch, options, tmp_path):
    gm = nf4_graph(arch, **options)
    rewrite.apply(gm, "lora", rank=4)
    randomize_lora(gm)
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    model, tensors = onnx_tensors(tmp_path / "model.onnx")
    written = [n for n in model.graph.node if n.op_type == "MatMulBnb4"]
    buffers = dict(gm.named_buffers())

    assert report.max_abs_diff <= 1e-4 and len(written) == len(gm.info.history[0]["report"]["modules"])
    assert {a.i for n in written for a in n.attribute if a.name == "quant_type"} == {1}
    assert all(np.array_equal(tensors[n.input[1]], buffers[n.input[1]].numpy()) for n in written)
    inputs = fresh_inputs(seed=9)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    expected, got = real_positions(logits(gm.eval(), inputs), torch.from_numpy(session.run(None, feeds)[0]), inputs)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())


@pytest.mark.parametrize("options,message", [
    ({"dtype": "nf4", "block_size": 16}, "quantize block size 16 is not supported for nf4; use a power of two from 32 "
                                         "to 4096"),
    ({"dtype": "nf4", "block_size": 8192}, "quantize block size 8192 is not supported for nf4"),
    ({"dtype": "nf4", "block_pattern": {"q_proj": 48}}, "quantize block size 48 for 'q_proj' is not supported for nf4"),
    ({"dtype": "nf4", "bits_pattern": {"q_proj": 8}}, "quantize bits_pattern applies to int4/int8, and dtype is nf4"),
    ({"dtype": "fp4"}, "quantize dtype 'fp4' is not supported; use int4, int8, nf4"),
])
def test_bad_nf4_options_are_one_sentence(options, message):
    with pytest.raises(RewriteError, match=re.escape(message)):
        rewrite.passes.create("quantize", **options)


def test_dtype_int8_is_bits_8_and_nf4_defaults_to_blocks_of_64():
    assert rewrite.passes.create("quantize", dtype="int8").bits == 8
    assert rewrite.passes.create("quantize").block_size == 32
    assert rewrite.passes.create("quantize", dtype="nf4").block_size == 64


def test_a_head_tied_to_the_embeddings_and_quantizing_twice_are_refused():
    gm = capture_tiny(tiny_model("gpt2"))
    with pytest.raises(RewriteError, match=re.escape("lm_head shares its weight with the input embeddings "
                                                     "transformer.wte (tied), so quantizing it alone would keep a "
                                                     "float and a quantized copy of one matrix; leave it float")):
        rewrite.apply(gm, "quantize", dtype="nf4", targets=["lm_head"])
    assert not any(map(quantized.is_quantized, gm.graph.nodes))
    rewrite.apply(gm, "quantize", dtype="nf4")
    with pytest.raises(RewriteError, match="transformer.h.0.attn.c_attn is already quantized"):
        rewrite.apply(gm, "quantize", dtype="nf4")


@SLOW
def test_cli_refuses_an_nf4_block_size_with_exit_2(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "graph.pt2"
    monkeypatch.setattr("sys.argv", ["rewrite", "apply", str(tiny_llama_dir), "--pass", "quantize", "--dtype", "nf4",
                                     "--block-size", "48", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "not supported for nf4" in capsys.readouterr().err.replace("\n", "")
    assert not out.exists()
