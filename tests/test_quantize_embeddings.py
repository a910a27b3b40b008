"""Quantized word embeddings (`quantize(embeddings=True)`): the table packed as MatMulNBits packs a weight, looked up
by `rewrite::gather_nbits`, bit-equal to ONNX Runtime's GatherBlockQuantized over the same bytes; LLaMA (untied)
and GPT-2 (a tied LM head quantized with the table, one packed copy) export as one GatherBlockQuantized and match
torch; LoRA and prompt tuning over them train; archives and quantizing while loading keep them; the refusals."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForCausalLM

import rewrite
import rewrite.passes
from rewrite.cli.main import cli
from rewrite.errors import RewriteError
from rewrite.export.onnx import real_positions
from rewrite.graph import quantized

from conftest import tiny_config, tiny_model
from helpers import capture_tiny, fresh_inputs, logits
from test_kv_cache import byte_tokenizer, tiny_lm
from test_quantize import onnx_tensors, same_bits, train_steps
from test_quantized_load import assert_same_graph, loaded_then_quantized

SLOW = pytest.mark.slow
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]


def ort_gather(packed: quantized.Packed, ids: torch.Tensor, bits: int, block: int) -> np.ndarray:
    """One GatherBlockQuantized over MatMulNBits' packing viewed `[vocab, bytes]`, as the export writes it."""
    vocab = packed.qweight.shape[0]
    tensors = {"data": packed.qweight.reshape(vocab, -1), "scales": packed.scales, "zero_points": packed.qzeros}
    present = {name: t for name, t in tensors.items() if t is not None}
    node = helper.make_node("GatherBlockQuantized", [*list(present)[:1], "ids", *list(present)[1:]], ["rows"],
                            domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(t.numpy(), name) for name, t in present.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids.numpy()})[0]


@pytest.mark.parametrize("bits,symmetric,block,hidden", [
    (bits, symmetric, block, hidden) for bits in (4, 8) for symmetric in (False, True)
    for block, hidden in ((16, 48), (32, 96), (64, 256), (128, 96))])
def test_the_lookup_is_gather_block_quantized_bit_for_bit(bits, symmetric, block, hidden):
    torch.manual_seed(bits + block + hidden)
    table = torch.randn(40, hidden) * 0.05
    packed = quantized.quantize(table, bits, block, symmetric)
    ids = torch.tensor([[0, 5, 39, 5], [-1, 7, 1, 2]])
    ours = torch.ops.rewrite.gather_nbits(packed.qweight, ids, packed.scales, packed.qzeros, hidden, bits, block)
    theirs = ort_gather(packed, ids, bits, block)[..., :hidden]  # a padded last block comes back padded

    assert same_bits(ours.numpy(), theirs)
    assert torch.equal(ours, quantized.dequantize(packed.qweight, packed.scales, packed.qzeros, hidden, bits)[ids])


def quantized_graph(arch: str, **options):
    gm = capture_tiny(tiny_model(arch))
    rewrite.apply(gm, "quantize", embeddings=True, **options)
    return gm


def exported(gm, path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Exports `gm`, checks the verification and ONNX Runtime's logits against torch's, and returns the model."""
    report = rewrite.export_onnx(gm, path)
    inputs = fresh_inputs(seed=9)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    expected, got = real_positions(logits(gm.eval(), inputs), torch.from_numpy(session.run(None, feeds)[0]), inputs)
    assert report.max_abs_diff <= 1e-4 and (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())
    return onnx_tensors(path)


def gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "GatherBlockQuantized"]


def test_llama_embeddings_export_as_one_gather_block_quantized_over_the_packed_table(tmp_path):
    gm = quantized_graph("llama")
    buffers = dict(gm.named_buffers())
    model, tensors = exported(gm, tmp_path / "model.onnx")
    (gather,) = gathers(model)
    attributes = {a.name: a.i for a in gather.attribute}

    assert gm.info.history[-1]["report"]["embeddings"] == "model.embed_tokens"
    assert "model.embed_tokens.weight" not in dict(gm.named_parameters()) and "model.embed_tokens.weight" not in tensors
    assert attributes == {"bits": 4, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    data = tensors.get(gather.input[0])  # the exporter folds the Reshape of a small table into a constant
    assert data is None or np.array_equal(data, buffers["model.embed_tokens.qweight"].reshape(len(data), -1).numpy())
    assert [tensors[name] is not None for name in gather.input[2:]] == [True, True]
    assert not any(n.op_type == "Gather" and n.input[0].startswith("model.embed_tokens") for n in model.graph.node)


@SLOW
def test_a_tied_gpt2_head_and_its_embeddings_share_one_packed_table_and_export(tmp_path):
    """A vocabulary of 1024 keeps the table above the size the exporter folds constants at, as a real one is."""
    config = tiny_config("gpt2")
    config.vocab_size = 1024
    torch.manual_seed(0)
    gm = capture_tiny(AutoModelForCausalLM.from_config(config).eval())
    rewrite.apply(gm, "quantize", embeddings=True, targets=[*GPT2_LINEAR, "lm_head"], bits=8, symmetric=True)
    head = next(n for n in gm.graph.nodes if quantized.is_quantized(n) and quantized.reads_a_table(gm, n))
    lookup = next(n for n in gm.graph.nodes if quantized.is_quantized_lookup(n))
    model, tensors = exported(gm, tmp_path / "model.onnx")
    (gather,) = gathers(model)
    view = next(n for n in model.graph.node if gather.input[0] in n.output)

    assert head.args[1].target == lookup.args[0].target == "transformer.wte.qweight"
    assert {n for n, _ in gm.named_buffers() if n.startswith(("transformer.wte", "lm_head"))} == {
        "transformer.wte.qweight", "transformer.wte.scales"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    assert not [n for n in names if n.startswith(("transformer.wte", "lm_head"))]
    assert view.op_type == "Reshape" and view.input[0] == "transformer.wte.qweight"
    assert "transformer.wte.qweight" in {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert [name for name, t in tensors.items() if t.shape[:1] == (1024,) and t.dtype == np.uint8] == [
        "transformer.wte.qweight"]  # one packed copy of the matrix in the file


def test_lora_trains_its_branches_over_quantized_embeddings_and_the_archive_round_trips(tmp_path):
    gm = quantized_graph("llama")
    rewrite.apply(gm, "lora", rank=4)
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
    assert any(quantized.is_quantized_lookup(n) for n in loaded.graph.nodes)


def test_prompt_tuning_reads_the_quantized_embeddings_output_and_trains():
    gm = quantized_graph("llama")
    table = quantized.dequantized_table(gm, next(n for n in gm.graph.nodes if quantized.is_quantized_lookup(n)))
    rewrite.apply(gm, "prompt", num_virtual_tokens=4)
    inputs = fresh_inputs()
    trained = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-1)
    gm.train()
    losses = []
    for _ in range(4):
        out = gm(**inputs).logits[:, 4:]  # the virtual tokens' positions come first
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                                 inputs["input_ids"][:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < losses[0] and [p.shape for p in trained] == [(4, table.shape[1])]


@pytest.mark.parametrize("arch,options", [("llama", {"symmetric": True}), ("gpt2", {"targets": [*GPT2_LINEAR, "lm_head"]})])
def test_quantizing_while_loading_fills_the_quantized_table(arch, options, tmp_path):
    tiny_model(arch, seed=3).save_pretrained(tmp_path)
    options = {"embeddings": True, **options}
    loaded = rewrite.load_pretrained(tmp_path, quantize=options)
    assert any(quantized.is_quantized_lookup(n) for n in loaded.graph.nodes)
    assert_same_graph(loaded, loaded_then_quantized(tmp_path, **options))


@pytest.mark.parametrize("arch,apply,message", [
    ("llama", lambda gm: rewrite.apply(gm, "quantize", dtype="nf4", embeddings=True),
     "quantized embeddings are int4/int8 (ONNX Runtime's GatherBlockQuantized has no NF4)"),
    ("llama", lambda gm: (rewrite.apply(gm, "quantize", embeddings=True),
                          rewrite.apply(gm, "lora", targets=["embed_tokens"])),
     "LoRA on the embedding model.embed_tokens is not supported: its table is quantized"),
    ("llama", lambda gm: (rewrite.apply(gm, "lora", rank=4, targets=["embed_tokens", "q_proj"]),
                          rewrite.apply(gm, "quantize", embeddings=True)),
     "the word embeddings model.embed_tokens carry an adapter, whose branch reads their float lookup"),
    ("gpt2", lambda gm: rewrite.apply(gm, "quantize", embeddings=True, targets=[*GPT2_LINEAR, "lm_head"],
                                      bits_pattern={"lm_head": 8}),
     "lm_head is tied to the embeddings transformer.wte but would be stored in another format"),
    ("gpt2", lambda gm: (rewrite.apply(gm, "quantize", embeddings=True, targets=[*GPT2_LINEAR, "lm_head"]),
                         rewrite.apply(gm, "lora", rank=4, targets=["lm_head"]),
                         rewrite.apply(gm, "fold", requantize=True)),
     "fold cannot requantize lm_head: its packed weights are the quantized embeddings' table too"),
    ("llama", lambda gm: rewrite.export_onnx(gm, "never.onnx", quantize_embeddings=True),
     "a block size, symmetric and quantized embeddings apply to post-training quantization"),
])
def test_refusals_are_one_sentence(arch, apply, message):
    gm = capture_tiny(tiny_model(arch))
    with pytest.raises(RewriteError, match=re.escape(message)):
        apply(gm)


def test_a_tied_head_quantized_without_its_embeddings_is_refused():
    with pytest.raises(RewriteError, match=re.escape("lm_head shares its weight with the input embeddings "
                                                     "transformer.wte (tied), so quantizing it alone")):
        rewrite.apply(capture_tiny(tiny_model("gpt2")), "quantize", targets=[*GPT2_LINEAR, "lm_head"])


@SLOW
def test_cli_export_quantizes_the_embeddings_when_asked(tmp_path):
    rewrite.save(capture_tiny(tiny_model("llama")), tmp_path / "float.pt2")
    output = tmp_path / "model.onnx"
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "float.pt2"), "--onnx", str(output),
                                      "--quantize", "int8", "--block-size", "16", "--quantize-embeddings"])
    assert result.exit_code == 0 and "max abs diff" in result.output, result.output
    (gather,) = gathers(onnx.load(str(output)))
    attributes = {a.name: a.i for a in gather.attribute}
    assert attributes == {"bits": 8, "block_size": 16, "gather_axis": 0, "quantize_axis": 1}


@SLOW
@pytest.mark.parametrize("method,options", [("prompt", {"num_virtual_tokens": 4}),
                                            ("ptuning", {"template": "[P] [P] {text} [P]", "encoder": "mlp"})])
def test_prompts_over_quantized_embeddings_export_with_the_cache(method, options, tmp_path):
    """Prompt tuning's cached prefix is computed through a float lookup of its own rows; P-tuning's routing reads
    the quantized lookup's output."""
    tiny_lm("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    gm = rewrite.load_pretrained(tmp_path)
    rewrite.apply(gm, "quantize", embeddings=True)
    rewrite.apply(gm, method, **options)
    report = rewrite.export_onnx(gm, tmp_path / "out" / "model.onnx", cache=True)
    assert report.max_abs_diff <= 1e-4 and len(gathers(onnx.load(str(tmp_path / "out" / "model.onnx")))) == 1
