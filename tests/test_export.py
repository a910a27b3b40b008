"""ONNX export: names, dynamic axes, ONNX Runtime parity, loud verification failures, no partial files."""
from __future__ import annotations

import onnx
import pytest
import torch

import rewrite
from rewrite import runtime
from rewrite.export.onnx import real_positions

from helpers import capture_tiny, fresh_inputs, logits, randomize_lora


@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("bert", "seq-cls"), ("gpt2", "causal-lm")])
def test_folded_export_matches_torch_on_new_shapes(make_tiny, tmp_path, arch, task):
    gm = capture_tiny(make_tiny(arch, task))
    rewrite.apply(gm, "lora", rank=4)
    randomize_lora(gm)
    rewrite.apply(gm, "fold")
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.input_names == ["input_ids", "attention_mask"] and report.output_names == ["logits"]
    assert report.max_abs_diff <= report.tolerance

    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert all(not d.HasField("dim_value") for d in model.graph.input[0].type.tensor_type.shape.dim)
    sess = runtime.session(tmp_path / "model.onnx")
    for batch, seq in [(1, 3), (5, 20)]:
        inputs = fresh_inputs(batch=batch, seq=seq, seed=9)
        got = torch.from_numpy(runtime.run(sess, inputs)["logits"])
        expected, got = real_positions(logits(gm, inputs), got, inputs)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_unfolded_lora_exports_too(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=4, dropout=0.1)
    randomize_lora(gm)
    gm.train()
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.max_abs_diff <= report.tolerance
    assert gm.training, "export restores the mode it found"


def test_export_writes_tokenizer_and_task_beside_the_model(tiny_bert_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert (tmp_path / "tokenizer.json").is_file()
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert props["rewrite.task"] == "seq-cls"


def test_verification_failure_is_loud_and_leaves_no_file(make_tiny, tmp_path, monkeypatch):
    gm = capture_tiny(make_tiny("llama"))
    monkeypatch.setattr("rewrite.export.onnx.TOLERANCE", 0.0)
    real_run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda sess, inputs: {k: v + 1e-3 for k, v in real_run(sess, inputs).items()})
    with pytest.raises(rewrite.RewriteError, match="ONNX verification failed for output 'logits'"):
        rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_large_models_use_external_data(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("rewrite.export.onnx.PROTOBUF_LIMIT", 0)
    gm = capture_tiny(make_tiny("llama"))
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.max_abs_diff <= report.tolerance
    assert (tmp_path / "model.onnx.data").is_file()
    assert (tmp_path / "model.onnx").stat().st_size < (tmp_path / "model.onnx.data").stat().st_size


def _replace(gm, name: str, value: torch.Tensor) -> None:
    module, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(module), leaf, torch.nn.Parameter(value))


def test_a_weight_of_another_shape_is_named_with_the_shape_its_config_gives(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    _replace(gm, "model.layers.0.self_attn.q_proj.weight", torch.zeros(65, 64))
    with pytest.raises(rewrite.RewriteError) as error:
        rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert str(error.value) == ("weight model.layers.0.self_attn.q_proj.weight has shape (65, 64) but the model's "
                                "config gives it (64, 64); the weights do not match the graph (re-create the archive)")
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_tensor_of_another_shape_is_named_with_the_op_that_cannot_use_it(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    rewrite.apply(gm, "lora", rank=4, roles=["q"])
    _replace(gm, "model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(5, 64))
    with pytest.raises(rewrite.RewriteError, match=r"cannot use weight model\.layers\.0\.self_attn\.q_proj\.lora_B\."
                                                   r"weight \(64, 4\) with inputs of shape \(2, 8, 5\); the weights do "
                                                   r"not match the graph"):
        rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_refused_even_without_verification(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("llama"))
    with torch.no_grad():
        gm.get_parameter("model.layers.1.mlp.up_proj.weight")[3, 4] = float("nan")
    with pytest.raises(rewrite.RewriteError, match="^weight model.layers.1.mlp.up_proj.weight holds NaN or infinite "
                                                   "values, so the exported model would compute NaN"):
        rewrite.export_onnx(gm, tmp_path / "model.onnx", verify=False)
    assert list(tmp_path.iterdir()) == []
