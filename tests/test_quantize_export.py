"""Export options for deployment: post-training int4/int8 quantization (`export --quantize`), composed with the
cache and adapter slots, and fp16. References: the quantize pass on the torch graph (ONNX Runtime at accuracy
level 0 within 1e-4, equal greedy tokens), the adapter unfolded over the quantized torch graph, and Hugging
Face's own fp16 model in eager torch."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

import rewrite
from rewrite import runtime
from rewrite.cli.main import cli, main
from rewrite.errors import RewriteError
from rewrite.export.onnx import FP16_TOLERANCE, real_positions
from rewrite.export.kv_cache import _decode
from rewrite.export.onnx_adapters import export_adapter
from rewrite.export.quantized import set_accuracy_level
from rewrite.graph import quantized
from rewrite.runtime.adapters import Adapters, stacked_feeds
from rewrite.runtime.schema import ModelSchema

from conftest import tiny_model
from helpers import capture_tiny, fresh_inputs, logits, randomize_lora
from test_quantize import SLOW, onnx_tensors, quantized_graph


def quantized_copy(gm, **options):
    """The reference: the quantize pass itself on a copy of the float graph."""
    gm = copy.deepcopy(gm)
    rewrite.apply(gm, "quantize", **options)
    return gm.eval()


def level_0_session(path) -> ort.InferenceSession:
    """The written model with its MatMulNBits set back to accuracy level 0, the level torch computes at."""
    model = onnx.load(str(path))
    set_accuracy_level(model, 0)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_matches(reference, got, inputs, tolerance: float = 1e-4) -> float:
    expected, got = real_positions(torch.as_tensor(reference).float(), torch.as_tensor(got).float(), inputs)
    diff = (got - expected).abs().max().item()
    assert diff <= tolerance * max(1.0, expected.abs().max().item()), diff
    return diff


def lora_folded_gpt2():
    gm = capture_tiny(tiny_model("gpt2"))
    rewrite.apply(gm, "lora", rank=4)
    randomize_lora(gm)
    rewrite.apply(gm, "fold")
    return gm


@pytest.mark.parametrize("arch,options", [
    pytest.param("llama", {"quantize": "int4", "accuracy_level": 4}, id="llama-int4"),
    pytest.param("gpt2", {"quantize": "int8", "block_size": 16, "symmetric": True}, id="gpt2-folded-int8", marks=SLOW),
])
def test_post_training_quantization_exports_the_quantize_pass_graph(arch, options, tmp_path):
    gm = capture_tiny(tiny_model(arch)) if arch == "llama" else lora_folded_gpt2()
    history = list(gm.info.history)
    reference = quantized_copy(gm, bits=int(options["quantize"][3:]), block_size=options.get("block_size", 32),
                               symmetric=options.get("symmetric", False))
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", **options)
    model, tensors = onnx_tensors(tmp_path / "model.onnx")
    written = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    levels = {a.i for n in written for a in n.attribute if a.name == "accuracy_level"}
    inputs = fresh_inputs(seed=9)
    session = level_0_session(tmp_path / "model.onnx")
    got = session.run(["logits"], {name: inputs[name].numpy() for name in ("input_ids", "attention_mask")})[0]

    assert report.max_abs_diff <= 1e-4 and levels == ({options["accuracy_level"]} if "accuracy_level" in options else set())
    assert len(written) == sum(map(quantized.is_quantized, reference.graph.nodes)) == (14 if arch == "llama" else 8)
    buffers = dict(reference.named_buffers())
    for node in written:
        for name in filter(None, node.input[1:4]):
            assert np.array_equal(tensors[name].view(np.uint8), buffers[name].numpy().view(np.uint8)), name
    assert_matches(logits(reference, inputs), got, inputs)
    assert gm.info.history == history and not any(map(quantized.is_quantized, gm.graph.nodes))  # the source is untouched


ADAPTERS = [(4, 8), (2, 4)]  # (rank, alpha)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A float LLaMA with an untrained LoRA exported fp32 and int4 with slots, and two trained adapters as PEFT
    directories and as adapter files made for the fp32 export (by `rewrite adapter export`'s function)."""
    directory = tmp_path_factory.mktemp("served")
    base = capture_tiny(tiny_model("llama"))
    untrained = copy.deepcopy(base)
    rewrite.apply(untrained, "lora", rank=4, roles=["q", "v"])
    rewrite.export_onnx(untrained, directory / "fp32.onnx", adapter_slots=True)
    rewrite.export_onnx(untrained, directory / "int4.onnx", adapter_slots=True, quantize="int4")
    trained = []
    for number, (rank, alpha) in enumerate(ADAPTERS):
        gm = copy.deepcopy(base)
        rewrite.apply(gm, "lora", rank=rank, alpha=alpha, roles=["q", "v"])
        randomize_lora(gm, seed=10 + number)
        rewrite.save_adapter(gm, directory / f"adapter{number}")
        export_adapter(directory / f"adapter{number}", directory / f"a{number}.onnx_adapter", directory / "fp32.onnx")
        trained.append(gm)
    return directory, trained, untrained


@SLOW
def test_an_int4_base_with_slots_runs_an_adapter_file_made_for_the_fp32_export_by_the_same_names(served):
    directory, trained, _ = served
    inputs = fresh_inputs()
    fp32, int4 = (onnx.load(str(directory / f"{name}.onnx")) for name in ("fp32", "int4"))
    names = [[i.name for i in model.graph.input] for model in (fp32, int4)]
    expected = logits(quantized_copy(trained[0], bits=4), inputs)  # the adapter unfolded over the quantized graph
    feeds, options, _ = Adapters(active=str(directory / "a0.onnx_adapter")).run_inputs(directory / "int4.onnx", 3)
    got = runtime.run(runtime.session(directory / "int4.onnx"), inputs | feeds, options)["logits"]

    assert names[0] == names[1] and not any(".quant." in name for name in names[1])
    assert sum(n.op_type == "MatMulNBits" for n in int4.graph.node) == 14
    assert all(fp32.metadata_props[i] == int4.metadata_props[i] for i in range(len(fp32.metadata_props))
               if fp32.metadata_props[i].key.startswith("rewrite.slots"))
    diff = assert_matches(expected, got, inputs)
    assert diff < (expected - logits(trained[0].eval(), inputs)).abs().max()  # the int4 base is not the float one


@SLOW
def test_mixed_adapters_on_an_int4_base_give_each_row_its_adapter_over_the_quantized_graph(served):
    directory, trained, untrained = served
    rewrite.export_onnx(untrained, directory / "mixed.onnx", mixed_adapters=True, quantize="int4")
    index = [0, 1, 1, 0]
    inputs = fresh_inputs(batch=len(index))
    files = [directory / f"a{number}.onnx_adapter" for number in range(len(ADAPTERS))]
    got = runtime.run(runtime.session(directory / "mixed.onnx"), inputs | stacked_feeds(files, directory / "mixed.onnx",
                                                                                       index))["logits"]
    for number, gm in enumerate(trained):
        expected = logits(quantized_copy(gm, bits=4), inputs)
        for row in (row for row, pick in enumerate(index) if pick == number):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            assert_matches(expected[row:row + 1], got[row:row + 1], one)


@SLOW
def test_an_fp16_export_with_slots_runs_an_adapter_file_made_for_it(served):
    directory, trained, untrained = served
    report = rewrite.export_onnx(untrained, directory / "fp16.onnx", adapter_slots=True, dtype="fp16")
    file = export_adapter(directory / "adapter1", directory / "a1-fp16.onnx_adapter", directory / "fp16.onnx")
    inputs = fresh_inputs()
    feeds, options, _ = Adapters(active=str(file)).run_inputs(directory / "fp16.onnx", 3)
    got = runtime.run(runtime.session(directory / "fp16.onnx"), inputs | feeds, options)["logits"]

    assert report.max_abs_diff <= report.tolerance and got.dtype == np.float16
    assert_matches(logits(trained[1].eval(), inputs), got, inputs, tolerance=FP16_TOLERANCE)


def hugging_face_fp16(arch: str, task: str, inputs):
    """Hugging Face's own fp16 model in eager torch: the independent reference."""
    model = tiny_model(arch, task).half()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch,task,options", [
    pytest.param("llama", "causal-lm", {}, id="llama"),
    pytest.param("bert", "seq-cls", {}, id="bert", marks=SLOW),
    pytest.param("gpt2", "causal-lm", {}, id="gpt2", marks=SLOW),  # its fp32 residual stream meets fp16 layer norms
    pytest.param("bloom", "causal-lm", {}, id="bloom", marks=SLOW),  # alibi attention: baddbmm and bmm
    pytest.param("llama", "causal-lm", {"quantize": "int4"}, id="llama-int4", marks=SLOW),
])
def test_fp16_export_computes_in_fp16_and_matches_hugging_faces_fp16_model(arch, task, options, tmp_path):
    gm = capture_tiny(tiny_model(arch, task))
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", dtype="fp16", **options)
    model, tensors = onnx_tensors(tmp_path / "model.onnx")
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    weights = [t for name, t in tensors.items() if t.dtype.kind == "f" and t.size > 64]
    inputs = fresh_inputs(seed=4)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {name: inputs[name].numpy() for name in ("input_ids", "attention_mask")})[0]

    assert types == {"input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64, "logits": TensorProto.FLOAT16}
    assert weights and all(t.dtype == np.float16 for t in weights)
    assert report.max_abs_diff <= report.tolerance and report.tolerance >= FP16_TOLERANCE
    if options:
        scales = [tensors[n.input[2]] for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(scales) == 14 and all(s.dtype == np.float16 for s in scales)  # MatMulNBits' T1 is A's type
        expected = logits(quantized_copy(gm, bits=4), inputs)  # the fp32 quantized graph: int4 and fp16 both lose
        assert_matches(expected, got, inputs, tolerance=2e-2)
    else:
        assert_matches(hugging_face_fp16(arch, task, inputs), got, inputs, tolerance=FP16_TOLERANCE)
        assert_matches(logits(gm, inputs), got, inputs, tolerance=FP16_TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=SLOW), pytest.param("bloom", marks=SLOW),
                                  pytest.param("qwen2", marks=SLOW)])
def test_an_fp16_export_with_the_cache_keeps_it_in_fp16_and_decodes_as_hugging_faces_fp16_model(arch, tmp_path):
    """Prefill and token-by-token decoding through ONNX Runtime against Hugging Face's fp16 model without a cache
    (GPT-2: learned positions; BLOOM: alibi, no position ids)."""
    gm = capture_tiny(tiny_model(arch))
    path = tmp_path / "model.onnx"
    report = rewrite.export_onnx(gm, path, cache=True, dtype="fp16")
    model = onnx.load(str(path), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    layout = ModelSchema.read(path).require_cache()
    decoded = _decode(runtime.session(path), layout, ids.numpy(), inputs["attention_mask"].numpy(), 5, {})

    cache_and_logits = [name for name in types if name.startswith(("past_key_values", "present")) or name == "logits"]
    assert len(cache_and_logits) == 9 and all(types[name] == TensorProto.FLOAT16 for name in cache_and_logits)
    assert layout.dtype == "float16" and report.max_abs_diff <= report.tolerance
    assert_matches(hugging_face_fp16(arch, "causal-lm", inputs), decoded, inputs, tolerance=FP16_TOLERANCE)


@SLOW
@pytest.mark.parametrize("cache", [False, True], ids=["plain", "cache"])
def test_an_nf4_graph_exports_in_fp16_with_its_absmax_cast_for_matmul_bnb4(cache, tmp_path):
    gm = quantized_graph("llama", dtype="nf4", block_size=32)
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", dtype="fp16", cache=cache)
    model = onnx.load(str(tmp_path / "model.onnx"))
    inputs = fresh_inputs(seed=5)

    assert sum(n.op_type == "MatMulBnb4" for n in model.graph.node) == 14
    assert report.max_abs_diff <= report.tolerance
    if not cache:
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {name: inputs[name].numpy() for name in ("input_ids", "attention_mask")})[0]
        assert got.dtype == np.float16
        assert_matches(logits(gm, inputs), got, inputs, tolerance=2e-2)  # the fp32 NF4 graph: fp16 loses the rest


@pytest.mark.parametrize("options,message", [
    ({"quantize": "int3"}, "export quantize 'int3' is not supported; use int4 or int8"),
    ({"quantize": "int4", "block_size": 48}, "quantize block size 48 is not supported"),
    ({"block_size": 64}, "a block size, symmetric and quantized embeddings apply to post-training quantization"),
    ({"dtype": "bf16"}, "export dtype 'bf16' is not supported; use fp32 or fp16"),
])
def test_bad_export_options_are_one_sentence_before_any_work(options, message, tmp_path):
    with pytest.raises(RewriteError, match=message):
        rewrite.export_onnx(capture_tiny(tiny_model("llama")), tmp_path / "model.onnx", **options)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    directory = tmp_path_factory.mktemp("archives")
    rewrite.save(capture_tiny(tiny_model("llama")), directory / "float.pt2")
    rewrite.save(quantized_graph("llama"), directory / "int4.pt2")
    return directory


@pytest.mark.parametrize("source,args,message", [
    ("float.pt2", ["--quantize", "int3"], "export quantize 'int3' is not supported; use int4 or int8"),
    ("float.pt2", ["--quantize", "int4", "--block-size", "24"], "quantize block size 24 is not supported"),
    ("float.pt2", ["--block-size", "64"], "--block-size does nothing without --quantize"),
    ("int4.pt2", ["--quantize", "int8"], "the graph is already quantized, so export cannot quantize it again"),
])
def test_cli_refuses_bad_quantize_options_with_exit_2_and_writes_nothing(archives, source, args, message, tmp_path,
                                                                          monkeypatch, capsys):
    output = tmp_path / "out" / "model.onnx"
    monkeypatch.setattr("sys.argv", ["rewrite", "export", str(archives / source), "--onnx", str(output), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.replace("\n", "")
    assert not output.parent.exists() or not any(output.parent.iterdir())


@SLOW
def test_cli_exports_a_float_archive_as_int4_with_its_block_size_symmetry_and_accuracy_level(archives, tmp_path):
    output = tmp_path / "model.onnx"
    result = CliRunner().invoke(cli, ["export", str(archives / "float.pt2"), "--onnx", str(output), "--quantize", "int4",
                                      "--block-size", "64", "--symmetric", "--accuracy-level", "4"])
    assert result.exit_code == 0 and "max abs diff" in result.output, result.output
    nodes = [n for n in onnx.load(str(output)).graph.node if n.op_type == "MatMulNBits"]
    attributes = {(a.name, a.i) for n in nodes for a in n.attribute}

    assert len(nodes) == 14 and all(len([i for i in n.input if i]) == 3 for n in nodes)  # symmetric: no zero points
    assert {("block_size", 64), ("bits", 4), ("accuracy_level", 4)} <= attributes
    assert not any(name == "block_size" and value != 64 for name, value in attributes)
    assert not any(map(quantized.is_quantized, rewrite.load(archives / "float.pt2").graph.nodes))
