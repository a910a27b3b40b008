"""Capture and train/eval switching."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

import rewrite
from rewrite.graph.synthetic_inputs import example_inputs

from conftest import TASK_CLASSES, tiny_config
from helpers import capture_tiny, fresh_inputs, logits


@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("bert", "seq-cls"), ("gpt2", "causal-lm")])
def test_capture_equals_eager_with_dynamic_batch_and_sequence(make_tiny, arch, task):
    model = make_tiny(arch, task)
    gm = capture_tiny(model)
    for batch, seq in [(1, 5), (4, 17)]:
        inputs = fresh_inputs(batch=batch, seq=seq)
        torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), atol=1e-6, rtol=0)
    assert gm.info.task == task


def test_train_and_eval_rewrite_dropout_like_pytorch(make_tiny):
    model = make_tiny("bert", "seq-cls")
    gm = capture_tiny(model)
    dropouts = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert dropouts and all(n.args[2] is False for n in dropouts) and all(n.args[4] == 0.0 for n in sdpa)
    inputs = fresh_inputs()

    gm.train()
    assert gm.training and all(n.args[2] is True for n in dropouts)
    assert all(n.args[4] == model.config.attention_probs_dropout_prob for n in sdpa)
    model.train()
    torch.manual_seed(3)
    ours = logits(gm, inputs)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, logits(model, inputs), atol=1e-6, rtol=0)

    gm.eval()
    model.eval()
    torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), atol=1e-6, rtol=0)


def test_capture_keeps_the_model_mode(make_tiny):
    model = make_tiny("llama").train()
    assert capture_tiny(model).training
    assert model.training


def test_tiny_batch_examples_are_refused(make_tiny):
    with pytest.raises(rewrite.RewriteError, match="must be at least 2"):
        rewrite.capture(make_tiny("llama"), example_inputs(["input_ids"], 128, batch=1, seq=8))


def test_load_pretrained_keeps_config_tokenizer_and_task(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir)
    assert gm.info.task == "seq-cls"
    assert gm.info.config.hidden_size == 32
    assert gm.info.tokenizer("hello")["input_ids"][0] == gm.info.tokenizer.cls_token_id
    assert gm.info.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    encoded = gm.info.tokenizer(["a fine day", "rain"], padding=True, return_tensors="pt")
    assert gm(**encoded).logits.shape == (2, 2)


def test_load_pretrained_on_meta_reads_no_weights(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="masked-lm", meta=True)
    assert all(p.device.type == "meta" for p in gm.parameters())
    rewrite.apply(gm, "lora", rank=4)
    assert gm.get_parameter("bert.encoder.layer.0.attention.self.query.lora_A.weight").device.type == "meta"
    with pytest.raises(rewrite.RewriteError, match="meta device"):
        rewrite.export_onnx(gm, "never.onnx")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(rewrite.RewriteError, match="has no config.json"):
        rewrite.load_pretrained(tmp_path)
    with pytest.raises(rewrite.RewriteError, match="does not exist"):
        rewrite.load_pretrained(tmp_path / "missing")


def test_unknown_task_lists_tasks(tiny_bert_dir):
    with pytest.raises(rewrite.RewriteError, match="task 'qa' is not known; use one of auto, causal-lm"):
        rewrite.load_pretrained(tiny_bert_dir, task="qa")


@pytest.mark.parametrize("config,names", [
    (transformers.DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=1, n_heads=4),
     ["input_ids", "attention_mask"]),
    (transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4), ["input_ids", "attention_mask", "token_type_ids"]),
    (transformers.RobertaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, type_vocab_size=1), ["input_ids", "attention_mask"]),
])
def test_a_directory_without_tokenizer_is_captured_with_the_inputs_its_forward_takes(tmp_path, config, names):
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    gm = rewrite.load_pretrained(tmp_path, task="seq-cls")
    assert gm.info.input_names == names and gm.info.tokenizer is None


def test_an_encoder_decoder_directory_is_refused_in_one_sentence(tmp_path):
    config = transformers.BartConfig(vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=32, decoder_ffn_dim=32)
    config.save_pretrained(tmp_path)
    with pytest.raises(rewrite.RewriteError, match="capturing bart from .* is not supported: it is an encoder-decoder"):
        rewrite.load_pretrained(tmp_path)


def test_non_finite_weights_are_refused_at_capture_naming_the_tensor(make_tiny, tiny_bert_dir, tmp_path):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(rewrite.RewriteError, match="^weight model.layers.0.mlp.down_proj.weight of LlamaForCausalLM "
                                                   "holds NaN or infinite values"):
        rewrite.capture(model, example_inputs(["input_ids"], 128))
    bert = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        bert.classifier.bias[1] = float("nan")
    bert.save_pretrained(tmp_path / "nan")
    with pytest.raises(rewrite.RewriteError, match=f"^weight classifier.bias in '{tmp_path / 'nan'}' holds NaN"):
        rewrite.load_pretrained(tmp_path / "nan")


DIRECTORY_PAGES = """
import gc, sys, rewrite
from pathlib import Path
def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
gm = rewrite.load_pretrained(sys.argv[1])  # once before the baseline: the modules loading imports on first use
del gm
gc.collect()
base = status("RssFile")
gm = rewrite.load_pretrained(sys.argv[1])
print(status("RssFile") - base, sum(p.nbytes for p in gm.parameters()))
"""


def test_a_model_directory_is_checked_and_mapped_without_its_weights_staying_resident(tmp_path):
    """Loading checks every weight and maps it, each on its own: none of the file's pages stays in the process (an FSDP
    rank then holds only the rows it keeps), and the graph computes what Hugging Face's model does."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.update(dict(vocab_size=32000, hidden_size=256, intermediate_size=512))  # 8 + 8 + 6 MiB of weights
    model = TASK_CLASSES["causal-lm"].from_config(config).eval()
    model.save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-c", DIRECTORY_PAGES, str(tmp_path)], capture_output=True, text=True,
                          check=True)
    resident, weights = (int(v) for v in done.stdout.split())
    assert resident < 0.1 * weights, resident / weights
    gm = rewrite.load_pretrained(tmp_path)
    inputs = example_inputs(["input_ids", "attention_mask"], 32000)
    torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
