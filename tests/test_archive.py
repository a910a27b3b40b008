"""`.pt2` archives: round trips keep weights, history, mode, tokenizer; bad files are clear errors."""
from __future__ import annotations

import pytest
import torch

import rewrite

from helpers import capture_tiny, fresh_inputs, logits, randomize_lora


def test_round_trip_keeps_outputs_history_and_trainable_flags(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("gpt2"))
    rewrite.apply(gm, "lora", rank=4, dropout=0.1)
    randomize_lora(gm)
    rewrite.save(gm, tmp_path / "g.pt2")
    loaded = rewrite.load(tmp_path / "g.pt2")
    inputs = fresh_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), atol=0, rtol=0)
    assert loaded.info.history == gm.info.history
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in gm.named_parameters() if p.requires_grad}
    loaded.train()
    assert any(n.args[2] is True for n in loaded.graph.nodes if n.target is torch.ops.aten.dropout.default)
    rewrite.apply(loaded, "fold")
    rewrite.apply(gm, "fold")
    torch.testing.assert_close(logits(loaded.eval(), inputs), logits(gm.eval(), inputs), atol=0, rtol=0)


def test_tied_weights_stay_tied(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("gpt2"))
    rewrite.save(gm, tmp_path / "g.pt2")
    loaded = rewrite.load(tmp_path / "g.pt2")
    shared = [n for n, _ in loaded.named_parameters(remove_duplicate=False)]
    assert len(shared) == len([n for n, _ in gm.named_parameters(remove_duplicate=False)])


def test_config_and_tokenizer_travel(tiny_bert_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_bert_dir)
    rewrite.save(gm, tmp_path / "g.pt2")
    loaded = rewrite.load(tmp_path / "g.pt2")
    assert loaded.info.config.to_dict() == gm.info.config.to_dict()
    assert loaded.info.tokenizer("hello world")["input_ids"] == gm.info.tokenizer("hello world")["input_ids"]
    assert loaded.info.task == "seq-cls" and loaded.info.source == str(tiny_bert_dir)


def test_meta_graphs_round_trip_as_shapes(tiny_bert_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_bert_dir, meta=True)
    rewrite.save(gm, tmp_path / "meta.pt2")
    loaded = rewrite.load(tmp_path / "meta.pt2")
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in gm.named_parameters()}
    assert all(p.device.type == "meta" for p in loaded.parameters())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_archives_are_a_clear_error(make_tiny, tmp_path, damage):
    path = tmp_path / "g.pt2"
    rewrite.save(capture_tiny(make_tiny("llama")), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a zip" * 10)
    with pytest.raises(rewrite.RewriteError, match="is not a readable rewrite graph archive"):
        rewrite.load(path)


def test_a_failed_save_leaves_no_file(make_tiny, tmp_path, monkeypatch):
    gm = capture_tiny(make_tiny("llama"))
    monkeypatch.setattr("rewrite.graph.archive._graph_json", lambda gm: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        rewrite.save(gm, tmp_path / "g.pt2")
    assert list(tmp_path.iterdir()) == []


def test_a_training_speed_graph_says_why_it_cannot_be_saved(make_tiny, tmp_path):
    gm = capture_tiny(make_tiny("bert"))
    rewrite.apply(gm, "fast_dropout")
    with pytest.raises(rewrite.RewriteError, match=r"operator rewrite\.graph\.dropout\.dropout cannot be stored as data .*"
                       r"training-speed passes in its history \(fast_dropout\)"):
        rewrite.save(gm, tmp_path / "g.pt2")
    assert list(tmp_path.iterdir()) == []
