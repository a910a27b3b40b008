"""ONNX export: names, dynamic axes, ONNX Runtime parity, loud verification failures, no partial files."""
from __future__ import annotations

import onnx
import pytest
import torch

import rewrite
from rewrite import runtime
from rewrite.export import real_positions

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
    monkeypatch.setattr("rewrite.export.TOLERANCE", 0.0)
    real_run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda sess, inputs: {k: v + 1e-3 for k, v in real_run(sess, inputs).items()})
    with pytest.raises(rewrite.RewriteError, match="ONNX verification failed for output 'logits'"):
        rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_large_models_use_external_data(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("rewrite.export.PROTOBUF_LIMIT", 0)
    gm = capture_tiny(make_tiny("llama"))
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.max_abs_diff <= report.tolerance
    assert (tmp_path / "model.onnx.data").is_file()
    assert (tmp_path / "model.onnx").stat().st_size < (tmp_path / "model.onnx.data").stat().st_size
