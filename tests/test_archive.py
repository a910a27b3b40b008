"""`.pt2` archives: round trips keep weights, history, mode, tokenizer; bad files are clear errors."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

import rewrite

from conftest import TASK_CLASSES, tiny_config
from helpers import capture_tiny, fresh_inputs, logits, mapped_ranges, randomize_lora


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


def _wide_vocab(arch: str):
    """A tiny model whose embeddings (and LM head) are 2 MiB each: big enough to be mapped from the archive."""
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.vocab_size = 8192
    return TASK_CLASSES["causal-lm"].from_config(config).eval()


def _in(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_large_parameters_are_mapped_from_the_archive_and_small_tensors_read(arch, tmp_path):
    gm = capture_tiny(_wide_vocab(arch))
    path = rewrite.save(gm, tmp_path / "g.pt2")
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("weights.safetensors").compress_type == zipfile.ZIP_STORED
    loaded = rewrite.load(path)
    ranges = mapped_ranges(path)
    for name, param in loaded.named_parameters():
        assert _in(param, ranges) == (param.nbytes >= 2**20), name
    assert not any(_in(buffer, ranges) for buffer in loaded.buffers())
    inputs = fresh_inputs(vocab=8192)
    torch.testing.assert_close(logits(loaded, inputs), logits(gm, inputs), atol=0, rtol=0)


def test_writing_a_mapped_weight_changes_the_model_not_the_archive_until_it_is_saved(tmp_path):
    gm = capture_tiny(_wide_vocab("llama"))
    path = rewrite.save(gm, tmp_path / "g.pt2")
    loaded = rewrite.load(path)
    embeddings = loaded.get_parameter("model.embed_tokens.weight")
    assert _in(embeddings, mapped_ranges(path))
    with torch.no_grad():
        embeddings.add_(1.0)
    original = gm.get_parameter("model.embed_tokens.weight")
    torch.testing.assert_close(rewrite.load(path).get_parameter("model.embed_tokens.weight"), original)
    rewrite.save(loaded, path)  # over the file it was mapped from
    torch.testing.assert_close(rewrite.load(path).get_parameter("model.embed_tokens.weight"), original + 1.0)
    torch.testing.assert_close(embeddings, original + 1.0)


def test_an_archive_whose_weights_are_not_aligned_loads_the_same(tmp_path):
    """Archives written before the weights were aligned (or rewritten by another zip tool) are read, not mapped."""
    gm = capture_tiny(_wide_vocab("llama"))
    path = rewrite.save(gm, tmp_path / "g.pt2")
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x", b"1")  # shifts every later member by an odd number of bytes
        for name, data in parts.items():
            archive.writestr(name, data)
    inputs = fresh_inputs(vocab=8192)
    torch.testing.assert_close(logits(rewrite.load(path), inputs), logits(gm, inputs), atol=0, rtol=0)


def test_weights_whose_offsets_leave_the_data_are_a_clear_error(tmp_path):
    gm = capture_tiny(_wide_vocab("llama"))
    path = rewrite.save(gm, tmp_path / "g.pt2")
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [8192, 64],
                                                       "data_offsets": [2**40, 2**40 + 8192 * 64 * 4]}}).encode()
    parts["weights.safetensors"] = struct.pack("<Q", len(header)) + header
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    with pytest.raises(rewrite.RewriteError, match="is not a readable rewrite graph archive .*offsets"):
        rewrite.load(path)


LOAD_PEAK = """
import sys, torch, rewrite
from pathlib import Path
def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
rewrite.load(sys.argv[1])  # once before the baseline: the modules loading imports on first use
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
gm = rewrite.load(sys.argv[1])
loaded = status("VmHWM") - base
total = sum(float(p.sum()) for p in gm.parameters())  # reads every weight
print(loaded, status("VmHWM") - base, sum(p.nbytes for p in gm.parameters()))
"""


def test_loading_holds_the_weights_once_and_pages_them_in_as_they_are_read(tmp_path):
    """Peak RSS of a fresh process: loading reads nothing; reading every weight brings them in once."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.update(dict(vocab_size=32000, hidden_size=256, intermediate_size=512))  # 8 + 8 + 6 MiB of weights
    gm = capture_tiny(TASK_CLASSES["causal-lm"].from_config(config).eval())
    path = rewrite.save(gm, tmp_path / "g.pt2")
    done = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path)], capture_output=True, text=True, check=True)
    loaded, read, weights = (int(v) for v in done.stdout.split())
    assert loaded < 0.3 * weights and read < 1.3 * weights, (loaded / weights, read / weights)
