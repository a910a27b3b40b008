"""Weight-only quantization: packing byte-equal to ONNX Runtime's own quantizer, dequantization bit-equal to its
MatMulNBits kernel, quantized graphs equal to ONNX Runtime on four architectures, LoRA over a quantized base,
archives, and the refusals."""
from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from click.testing import CliRunner
from onnxruntime.quantization import matmul_nbits_quantizer as mnq

import rewrite
import rewrite.passes
from rewrite.cli.main import cli, main
from rewrite.errors import RewriteError
from rewrite.export.onnx import real_positions
from rewrite.graph import nf4, quantized
from rewrite.graph.query import GraphQuery

from conftest import tiny_model
from helpers import capture_tiny, fresh_inputs, logits, randomize_lora


def ort_quantizer(weight: torch.Tensor, bits: int, block: int, symmetric: bool):
    """ONNX Runtime's quantizer (default config) over one MatMul by `weight.T`: its model and B, scales, zero points."""
    n, k = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(weight.T.contiguous().numpy(), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric)
    quantizer.process()
    model = quantizer.model.model
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, tensors[node.input[1]], tensors[node.input[2]], tensors[node.input[3]] if len(node.input) > 3 else None


def ort_weight(model, k: int) -> np.ndarray:
    """The weight `[N, K]` ONNX Runtime's kernel multiplies by (accuracy level 0), read exactly: `eye(K) @ W`.
    -0.0 comes back as +0.0, so zeros are compared without their sign."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"X": np.eye(k, dtype=np.float32)})[0].T


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = (np.where(t == 0, np.float32(0), t).astype(np.float32) for t in (a, b))
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


CASES = [(bits, symmetric, block, k) for bits in (4, 8) for symmetric in (False, True)
         for block, k in ((32, 96), (16, 33), (64, 200), (128, 128), (256, 300))]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("bits,symmetric,block,k", CASES)
def test_packing_is_onnx_runtimes_byte_for_byte_and_dequant_its_kernel_bit_for_bit(bits, symmetric, block, k, chunked,
                                                                                   monkeypatch):
    """Chunked: a large weight is quantized a few rows at a time (here five), with the same bytes."""
    if chunked:
        monkeypatch.setattr(nf4, "CHUNK", 5 * k)
    torch.manual_seed(k + block)
    weight = torch.randn(24, k) * 0.05
    weight[0, :5] = 0.0  # an all-zero start and exact zeros
    model, qweight, scales, qzeros = ort_quantizer(weight, bits, block, symmetric)
    packed = quantized.quantize(weight, bits, block, symmetric)

    if bits == 4 and k % 2:  # MLAS leaves a stale value in the nibble after an odd K, which its kernel never reads
        qweight = qweight.copy()
        qweight.reshape(24, -1)[:, k // 2] &= 0x0F
    assert np.array_equal(packed.qweight.numpy(), qweight)
    assert np.array_equal(packed.scales.numpy().view(np.uint32), scales.view(np.uint32))
    assert (packed.qzeros is None) == (qzeros is None) == symmetric
    assert qzeros is None or np.array_equal(packed.qzeros.numpy(), qzeros)
    ours = quantized.dequantize(packed.qweight, packed.scales, packed.qzeros, k, bits).numpy()
    assert same_bits(ours, ort_weight(model, k))


def quantized_graph(arch: str, task: str = "causal-lm", **options):
    gm = capture_tiny(tiny_model(arch, task))
    rewrite.apply(gm, "quantize", **options)
    return gm


def onnx_tensors(path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    return model, {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


SLOW = pytest.mark.slow  # an export takes 5-10 s on a loaded 2-core machine
GRAPHS = [("llama", "causal-lm", {}), ("gpt2", "causal-lm", {"bits": 8}), ("bert", "seq-cls", {"symmetric": True}),
          ("qwen2", "causal-lm", {"block_size": 16, "bits_pattern": {"down_proj": 8}})]


@pytest.mark.parametrize("arch,task,options", [pytest.param(*g, id=g[0], marks=() if g[0] == "llama" else SLOW)
                                               for g in GRAPHS])
def test_the_quantized_graph_exports_one_matmulnbits_per_projection_holding_its_buffers(arch, task, options, tmp_path):
    gm = quantized_graph(arch, task, **options)
    nodes = [n for n in gm.graph.nodes if quantized.is_quantized(n)]
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    model, tensors = onnx_tensors(tmp_path / "model.onnx")
    written = [n for n in model.graph.node if n.op_type == "MatMulNBits"]

    assert report.max_abs_diff <= 1e-4 and len(written) == len(nodes) == len(gm.info.history[-1]["report"]["modules"])
    buffers = dict(gm.named_buffers())
    for node in written:
        for name in node.input[1:4]:
            if name:
                assert np.array_equal(tensors[name].view(np.uint8), buffers[name].numpy().view(np.uint8)), name
    inputs = fresh_inputs(seed=9)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    expected, got = real_positions(logits(gm.eval(), inputs), torch.from_numpy(session.run(None, feeds)[0]), inputs)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())


def test_gpt2_conv1d_in_out_weights_are_quantized_transposed_and_heads_and_embeddings_stay_float():
    model = tiny_model("gpt2")
    gm = quantized_graph("gpt2")
    report = gm.info.history[-1]["report"]
    weight = model.transformer.h[0].attn.c_attn.weight.detach()  # [in, out]
    node = next(n for n in gm.graph.nodes if quantized.is_quantized(n))
    packed = quantized.quantize(weight.T, 4, 32, False)
    expected = quantized.dequantize(packed.qweight, packed.scales, packed.qzeros, weight.shape[0], 4)

    assert torch.equal(quantized.dequantized_weight(gm, node), expected)
    assert (expected - weight.T).abs().max() <= packed.scales.abs().max() / 2 + 1e-7
    assert not any(path.startswith("lm_head") for path in report["modules"]) and len(report["modules"]) == 8
    assert "transformer.wte.weight" in dict(gm.named_parameters())
    assert all(p.quantized for p in GraphQuery(gm).projections if p.path.startswith("transformer.h."))


def test_per_module_bits_and_block_sizes_follow_their_patterns():
    gm = quantized_graph("llama", bits_pattern={"down_proj": 8}, block_pattern={r"layers\.1\..*": 16})
    report, buffers = gm.info.history[-1]["report"], dict(gm.named_buffers())

    assert {p: report["bits"][p] for p in report["modules"] if p.endswith("down_proj")} == {
        "model.layers.0.mlp.down_proj": 8, "model.layers.1.mlp.down_proj": 8}
    assert buffers["model.layers.0.mlp.down_proj.qweight"].shape == (64, 128 // 32, 32)  # int8: a byte a weight
    assert buffers["model.layers.1.mlp.down_proj.qweight"].shape == (64, 128 // 16, 16)
    assert buffers["model.layers.1.self_attn.q_proj.qweight"].shape == (64, 64 // 16, 8)  # int4: two a byte
    assert buffers["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 64 // 32, 16)


def train_steps(gm, steps: int = 4) -> list[float]:
    inputs = fresh_inputs()
    ids = inputs["input_ids"]
    trained = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    gm.train()
    losses = []
    for _ in range(steps):
        out = gm(**inputs).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("lora_first", [pytest.param(False, id="quantize-then-lora"),
                                        pytest.param(True, id="lora-then-quantize", marks=SLOW)])
def test_lora_over_a_quantized_base_trains_only_its_branches_and_round_trips_the_archive(lora_first, tmp_path):
    gm = capture_tiny(tiny_model("llama"))
    steps = [("lora", {"rank": 4}), ("quantize", {})]
    for name, options in reversed(steps) if not lora_first else steps:
        rewrite.apply(gm, name, **options)
    lora = next(h for h in gm.info.history if h["pass"] == "lora")
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    losses = train_steps(gm)

    assert lora["report"]["targets"] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert losses[-1] < losses[0]
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        f"{path}.lora_{f}.weight" for path in lora["report"]["targets"] for f in "AB"}
    assert all(torch.equal(b, buffers[name]) for name, b in gm.named_buffers())
    rewrite.save(gm, tmp_path / "graph.pt2")
    loaded = rewrite.load(tmp_path / "graph.pt2")
    inputs = fresh_inputs(seed=3)
    torch.testing.assert_close(logits(loaded.eval(), inputs), logits(gm.eval(), inputs), rtol=0, atol=0)
    report = rewrite.export_onnx(loaded, tmp_path / "slots.onnx", adapter_slots=True)
    assert report.max_abs_diff <= 1e-4 and any("lora_A" in name for name in report.adapter_inputs)


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "quantize bits 3 is not supported; use 4 or 8"),
    ({"block_size": 48}, "quantize block size 48 is not supported; use a power of two from 16 to 256"),
    ({"block_size": 512}, "quantize block size 512 is not supported"),
    ({"block_pattern": {"q_proj": 8}}, "quantize block size 8 for 'q_proj' is not supported"),
    ({"bits_pattern": [8]}, "quantize bits_pattern [8] is not a mapping"),
])
def test_bad_quantize_options_are_one_sentence(options, message):
    with pytest.raises(RewriteError, match=re.escape(message)):
        rewrite.passes.create("quantize", **options)


def test_an_unknown_target_is_one_sentence():
    with pytest.raises(RewriteError, match=re.escape("Quantize targets ['nothing_here'] match no module; linear")):
        quantized_graph("llama", targets=["nothing_here"])


def test_quantizing_twice_and_a_lossy_fold_are_refused(tmp_path):
    gm = quantized_graph("llama")
    with pytest.raises(RewriteError, match="is already quantized"):
        rewrite.apply(gm, "quantize")
    rewrite.apply(gm, "lora", rank=4)
    with pytest.raises(RewriteError, match="would merge it into quantized weights, which is lossy"):
        rewrite.apply(gm, "fold")
    with pytest.raises(RewriteError, match="accuracy level 7 is not one of"):
        rewrite.export_onnx(gm, tmp_path / "model.onnx", accuracy_level=7)
    with pytest.raises(RewriteError, match="has no quantized projection"):
        rewrite.export_onnx(capture_tiny(tiny_model("llama")), tmp_path / "model.onnx", accuracy_level=4)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("method", ["dora", "pissa"])
def test_methods_that_compute_from_the_float_weight_refuse_a_quantized_one(method):
    gm = quantized_graph("llama")
    with pytest.raises(RewriteError, match="computes from the float weight of model.layers.0.self_attn.q_proj, which "
                                           "is quantized; put LoRA or IA³ on a quantized base"):
        rewrite.apply(gm, method)


def test_ia3_over_a_quantized_base_keeps_float_vectors_and_trains():
    gm = quantized_graph("llama")
    rewrite.apply(gm, "ia3")
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.float32}
    losses = train_steps(gm)
    assert losses[-1] < losses[0]


@SLOW
def test_accuracy_level_is_written_after_verifying_at_level_0(tmp_path):
    gm = quantized_graph("llama")
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", accuracy_level=4)
    model, _ = onnx_tensors(tmp_path / "model.onnx")
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert report.max_abs_diff <= 1e-4 and levels == {4}


@SLOW
@pytest.mark.parametrize("post_training", [False, True], ids=["quantized-graph", "export-quantize"])
def test_greedy_generation_with_the_cache_on_int4_llama_is_the_quantized_graphs(tmp_path, post_training):
    """The reference is the quantized torch graph without a cache, one greedy step at a time; the export quantizes
    a float graph itself with `quantize="int4"`."""
    from test_kv_cache import TEXTS, byte_tokenizer, tiny_lm
    from rewrite.runtime.generate import generate

    tiny_lm("llama").save_pretrained(tmp_path)
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    gm = rewrite.load_pretrained(tmp_path)
    reference = rewrite.apply(copy.deepcopy(gm) if post_training else gm, "quantize", bits=4, block_size=32).eval()
    rewrite.export_onnx(gm, tmp_path / "onnx" / "model.onnx", cache=True, **({"quantize": "int4"} if post_training else {}))
    ours = generate(tmp_path / "onnx" / "model.onnx", TEXTS, max_new_tokens=12, eos=[], keep_logits=True)
    for row, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        for step in range(12):
            with torch.no_grad():
                step_logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            assert np.abs(ours.logits[step][row] - step_logits.numpy()).max() <= 1e-4
            assert ours.token_ids[row, step] == int(step_logits.argmax())
            ids = torch.cat([ids, step_logits.argmax().view(1, 1)], 1)
    assert len(set(ours.token_ids[0].tolist())) > 3


@SLOW
def test_cli_quantizes_under_lora_and_refuses_a_lossy_fold_and_bad_bits_with_exit_2(tiny_bert_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    graph = tmp_path / "graph.pt2"
    made = CliRunner().invoke(cli, ["apply", str(tiny_bert_dir), "--pass", "quantize", "--pass", "lora", "--bits", "8",
                                    "--block-size", "16", "-o", str(graph)])
    assert made.exit_code == 0, made.output
    history = rewrite.load(graph).info.history
    assert [h["pass"] for h in history] == ["quantize", "lora"] and set(history[0]["report"]["bits"].values()) == {8}
    for args, message in [(["fold", str(graph), "-o", str(tmp_path / "folded.pt2")], "which is lossy"),
                          (["apply", str(graph), "--pass", "quantize", "--bits", "3", "-o", str(tmp_path / "b.pt2")],
                           "quantize bits 3 is not supported")]:
        monkeypatch.setattr("sys.argv", ["rewrite", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.pt2"]
    folded = CliRunner().invoke(cli, ["fold", str(graph), "--requantize", "-o", str(tmp_path / "folded.pt2")])
    assert folded.exit_code == 0 and "requantized 4 modules" in folded.output, folded.output
    assert not any("lora" in name for name, _ in rewrite.load(tmp_path / "folded.pt2").named_parameters())


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=SLOW)])
def test_fold_requantize_quantizes_the_merged_weights_again_and_reports_the_loss(arch):
    gm = quantized_graph(arch)
    rewrite.apply(gm, "lora", rank=4)
    randomize_lora(gm)
    node = next(n for n in gm.graph.nodes if quantized.is_quantized(n) and n.args[1].target.startswith(
        "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"))
    path = node.args[1].target.rpartition(".")[0]
    a, b = (dict(gm.named_parameters())[f"{path}.lora_{f}.weight"].detach() for f in "AB")
    merged = quantized.dequantized_weight(gm, node) + 2.0 * b @ a  # alpha 8 / rank 4
    expected = quantized.quantize(merged, 4, 32, False)
    inputs = fresh_inputs()
    unfolded = logits(gm.eval(), inputs)
    rewrite.apply(gm, "fold", requantize=True)
    report = gm.info.history[-1]["report"]["requantized"]
    node = next(n for n in gm.graph.nodes if quantized.is_quantized(n) and n.args[1].target == f"{path}.qweight")

    assert torch.equal(dict(gm.named_buffers())[f"{path}.qweight"], expected.qweight)
    assert torch.equal(quantized.dequantized_weight(gm, node), quantized.dequantize(
        expected.qweight, expected.scales, expected.qzeros, merged.shape[1], 4))
    assert not any("lora" in name for name, _ in gm.named_parameters()) and path in report["modules"]
    assert 0 < report["weight_error"] <= expected.scales.abs().max() and 0 < report["output_difference"]
    assert (logits(gm.eval(), inputs) - unfolded).abs().max() > 0
