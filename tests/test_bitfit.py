"""BitFit, the README's example pass: one file gives it CLI flags, adapter files, export metadata and fold."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

import rewrite
from rewrite.graph.params import trainable_parameters_line
from rewrite.cli.main import cli
from rewrite.errors import RewriteError
from rewrite.training.train import TrainConfig

from helpers import fresh_inputs, logits, sentiment_rows

HEAD = {"classifier.weight", "classifier.bias"}


def _classifier(model_dir):
    torch.manual_seed(0)
    return rewrite.load_pretrained(model_dir, task="seq-cls", num_labels=2)


def test_only_the_biases_and_the_head_train(no_dropout_dir):
    gm = _classifier(no_dropout_dir)
    biases = {n for n, p in gm.named_parameters() if n.endswith(".bias")}
    rewrite.apply(gm, "bitfit")
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == biases | HEAD
    count = sum(p.numel() for n, p in gm.named_parameters() if n in trainable)
    assert trainable_parameters_line(gm).startswith(f"trainable params: {count:,d} ||")
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    rewrite.train(gm, sentiment_rows(32, seed=0), config=TrainConfig(max_steps=3, batch_size=8, lr=1e-2, progress=False))
    changed = {n for n, p in gm.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    assert changed <= trainable and HEAD <= changed
    assert len(changed & biases) > len(biases) // 2  # key biases cannot move: softmax ignores them


def test_scope_linear_leaves_the_norms_alone(tiny_bert_dir):
    gm = _classifier(tiny_bert_dir)
    rewrite.apply(gm, "bitfit", scope="linear", modules_to_save=[])
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") and "LayerNorm" not in n for n in trainable)
    assert "bert.encoder.layer.0.attention.self.query.bias" in trainable


def test_adapter_files_round_trip_and_the_folded_graph_exports_with_its_metadata(tiny_bert_dir, tmp_path):
    gm = _classifier(tiny_bert_dir)
    rewrite.apply(gm, "bitfit", targets=["query", "value"])
    with torch.no_grad():
        for name in gm.info.trainable:
            gm.get_parameter(name).add_(torch.randn_like(gm.get_parameter(name)) * 0.1)
    rewrite.save_adapter(gm, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    loaded = rewrite.load_adapter(_classifier(tiny_bert_dir), tmp_path / "adapter")
    inputs = fresh_inputs(vocab=30522)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), rtol=0, atol=0)
    assert loaded.info.history[-1]["pass"] == "bitfit"

    rewrite.apply(gm, "fold")
    assert gm.info.history[-1]["report"]["summary"] == "folded 4 tuned biases into the base weights"
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == HEAD
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.max_abs_diff is not None
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert props["rewrite.bitfit_biases"] == "4"


def test_its_options_are_cli_flags(tiny_bert_dir, tmp_path):
    runner = CliRunner()
    done = runner.invoke(cli, ["apply", str(tiny_bert_dir), "--pass", "bitfit", "--scope", "linear",
                               "--targets", "dense", "-o", str(tmp_path / "b.pt2")])
    assert done.exit_code == 0, done.output
    assert rewrite.load(tmp_path / "b.pt2").info.history[-1]["options"]["scope"] == "linear"
    refused = runner.invoke(cli, ["apply", str(tiny_bert_dir), "--pass", "bitfit", "--scope", "norms",
                                  "-o", str(tmp_path / "c.pt2")])
    assert refused.exit_code == 2 and "'norms' is not one of 'all', 'linear'" in refused.output


def test_bad_options_are_one_sentence(tiny_bert_dir):
    with pytest.raises(RewriteError, match="BitFit scope 'norms' is not known; use one of all, linear"):
        rewrite.passes.create("bitfit", scope="norms")
    with pytest.raises(RewriteError, match="BitFit finds no bias to train"):
        rewrite.apply(_classifier(tiny_bert_dir), "bitfit", targets=["nothing"])
