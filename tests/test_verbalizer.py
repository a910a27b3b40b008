"""Verbalizer pass: label scores equal the full MLM logits at the mask (PET and OpenPrompt), the head is
pruned to the mask position and the label rows, ONNX matches torch, bad input fails clearly."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import transformers

import rewrite
from rewrite import runtime
from rewrite.errors import RewriteError
from rewrite.graph.ir import tensor_at

from helpers import randomize_lora

SINGLE = {"negative": ["bad"], "positive": ["good"]}
MULTI = {"negative": ["bad", "terrible", "awful"], "positive": ["good", "great"]}
TEXTS = ["a fine film . it was [MASK] .", "[MASK] ! the plot is thin and the acting is flat , sadly", "it is [MASK]"]


def _inputs(directory, texts=TEXTS):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer(texts, padding=True, return_tensors="pt"), tokenizer


def _at_mask(full_logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    rows = torch.arange(input_ids.shape[0])
    return full_logits[rows, (input_ids == mask_id).int().argmax(1)]


def _reference_scores(at_mask: torch.Tensor, tokenizer, labels: dict, aggregation: str) -> torch.Tensor:
    """PET: mean of each label's word logits; OpenPrompt: softmax over all label words, log(p + 1e-15), mean."""
    ids = [tokenizer.convert_tokens_to_ids(words) for words in labels.values()]
    if aggregation == "mean":
        return torch.stack([at_mask[:, i].mean(-1) for i in ids], dim=1)
    flat = [i for label_ids in ids for i in label_ids]
    log_probs = torch.log(torch.softmax(at_mask[:, flat], dim=-1) + 1e-15)
    bounds = torch.tensor([0, *map(len, ids)]).cumsum(0).tolist()
    return torch.stack([log_probs[:, a:b].mean(-1) for a, b in zip(bounds, bounds[1:])], dim=1)


@pytest.mark.parametrize("aggregation", ["mean", "log-softmax"])
@pytest.mark.parametrize("labels", [SINGLE, MULTI], ids=["one-word", "several-words"])
def test_scores_equal_full_mlm_logits_at_the_mask(tiny_mlm_dir, labels, aggregation):
    reference = transformers.BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=labels, aggregation=aggregation)
    for texts in (TEXTS, TEXTS[:2] + ["short [MASK]", "[MASK] " + "long " * 40]):
        inputs, tokenizer = _inputs(tiny_mlm_dir, texts)
        with torch.no_grad():
            got = gm(**inputs).logits
            at_mask = _at_mask(reference(**inputs).logits, inputs["input_ids"], tokenizer.mask_token_id)
        assert got.shape == (len(texts), len(labels))
        torch.testing.assert_close(got, _reference_scores(at_mask, tokenizer, labels, aggregation), atol=1e-5, rtol=0)


def test_head_is_pruned_to_mask_position_and_label_rows(tiny_mlm_dir):
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=MULTI)
    aten = torch.ops.aten
    linear_weights = [n.args[1] for n in gm.graph.find_nodes(op="call_function", target=aten.linear.default)]
    vocab_rows = [w for w in linear_weights if w.op == "get_attr" and tensor_at(gm, w.target).shape[0] == 30522]
    assert vocab_rows == []
    selects = gm.graph.find_nodes(op="call_function", target=aten.index_select.default)
    assert {n.args[0].target for n in selects} == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert gm.info.task == "seq-cls"
    assert gm.info.config.id2label == {0: "negative", 1: "positive"}
    assert gm.info.history[-1]["report"]["mlm_head"] == "pretrained"


def test_the_last_block_runs_on_the_mask_rows_except_keys_and_values(tiny_mlm_dir):
    """The gather moves up through the last block (query, attention for the one query row, output
    projection, residuals, norms, feed-forward), so the whole verbalizer graph costs fewer FLOPs than
    the bare encoder without any head."""
    from torch.utils.flop_counter import FlopCounterMode

    from rewrite.graph.query import module_path

    encoder = transformers.BertModel.from_pretrained(tiny_mlm_dir, add_pooling_layer=False).eval()
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=MULTI)
    inputs, _ = _inputs(tiny_mlm_dir, TEXTS[:2] + ["[MASK] " + "long " * 40])
    with torch.no_grad(), FlopCounterMode(display=False) as pruned:
        gm(**inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as bare:
        encoder(**inputs)
    assert pruned.get_total_flops() < bare.get_total_flops()
    last_block = [n for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
                  if (module_path(n) or "").startswith("bert.encoder.layer.1.")]
    full_length = sorted(module_path(n) for n in last_block if "val" in n.meta)  # copies on the rows have none
    assert len(last_block) == 6
    assert full_length == ["bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"]


def test_lora_on_every_projection_keeps_scores_and_gradients_of_the_full_computation(tiny_mlm_dir):
    """LoRA branches in the moved part of the last block (output projection, feed-forward) are moved too."""
    graphs = []
    for verbalize in (True, False):
        gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
        rewrite.apply(gm, "lora", rank=4, roles=["q", "k", "v", "o", "mlp"])
        if verbalize:
            rewrite.apply(gm, "verbalizer", labels=MULTI)
            randomize_lora(gm)
        graphs.append(gm)
    pruned, full = graphs
    full.load_state_dict({k: v for k, v in pruned.state_dict().items() if k in full.state_dict()}, strict=False)
    inputs, tokenizer = _inputs(tiny_mlm_dir)
    ours = pruned(**inputs).logits
    reference = _reference_scores(_at_mask(full(**inputs).logits, inputs["input_ids"], tokenizer.mask_token_id),
                                  tokenizer, MULTI, "mean")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    ours.sum().backward()
    reference.sum().backward()
    grads = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 6 * 2  # A and B of q, k, v, o and the two feed-forward projections, 2 layers
    for name, param in pruned.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=0)


def test_mlm_logits_output_keeps_the_full_head(tiny_mlm_dir):
    reference = transformers.BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=SINGLE, mlm_logits=True)
    inputs, _ = _inputs(tiny_mlm_dir)
    with torch.no_grad():
        outputs = gm(**inputs)
        torch.testing.assert_close(outputs.mlm_logits, reference(**inputs).logits, atol=1e-5, rtol=0)
    assert outputs.logits.shape == (3, 2)


def test_head_without_checkpoint_weights_is_built_from_tied_embeddings(headless_dir, caplog):
    base = transformers.BertModel.from_pretrained(headless_dir, add_pooling_layer=False).eval()
    gm = rewrite.load_pretrained(headless_dir, task="masked-lm")
    with caplog.at_level(logging.WARNING, logger="rewrite"):
        rewrite.apply(gm, "verbalizer", labels=MULTI)
    assert "built the head from the tied input embeddings" in caplog.text
    head = ["cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.bias"]  # the decoder's bias, under the name named_parameters() lists
    assert sorted(gm.info.trainable) == sorted(head)
    assert sorted(n for n, p in gm.named_parameters() if p.requires_grad) == sorted(head)

    inputs, tokenizer = _inputs(headless_dir)
    with torch.no_grad():
        hidden = _at_mask(base(**inputs).last_hidden_state, inputs["input_ids"], tokenizer.mask_token_id)
        # identity transform: LayerNorm(GELU(h + 10)) = LayerNorm(h) to within GELU's tail at >= 6
        normed = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:], eps=base.config.layer_norm_eps)
        full = normed @ base.embeddings.word_embeddings.weight.T
        got = gm(**inputs).logits
    torch.testing.assert_close(got, _reference_scores(full, tokenizer, MULTI, "mean"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [("prompt", "verbalizer"), ("verbalizer", "prompt")])
def test_composes_with_prompt_tuning_in_either_order(tiny_mlm_dir, order):
    """Prepended virtual tokens shift the mask position; the scores still read the mask's hidden state."""
    reference = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    torch.manual_seed(0)
    rewrite.apply(reference, "prompt", num_virtual_tokens=3)
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    for name in order:
        torch.manual_seed(0)
        rewrite.apply(gm, name, **({"num_virtual_tokens": 3} if name == "prompt" else {"labels": MULTI}))
    inputs, tokenizer = _inputs(tiny_mlm_dir)
    with torch.no_grad():
        full = reference(**inputs).logits[:, 3:]  # the user's positions, after the 3 virtual tokens
        expected = _reference_scores(_at_mask(full, inputs["input_ids"], tokenizer.mask_token_id), tokenizer, MULTI,
                                     "mean")
        torch.testing.assert_close(gm(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_a_tied_tensor_marked_under_any_of_its_names_trains_once(tiny_mlm_dir):
    from rewrite.graph.params import mark_trainable

    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    assert gm.get_parameter("cls.predictions.decoder.weight") is gm.get_parameter("bert.embeddings.word_embeddings.weight")
    mark_trainable(gm, ["cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"])
    assert gm.info.trainable == ["bert.embeddings.word_embeddings.weight"]
    assert gm.get_parameter("cls.predictions.decoder.weight").requires_grad


@pytest.mark.parametrize("mlm_logits", [False, True])
def test_lora_after_the_verbalizer_trains_the_head_not_an_encoder_layer(tiny_mlm_dir, mlm_logits):
    """The whole head module (transform and decoder bias), but not the tied decoder: that is the whole
    word-embedding table."""
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=SINGLE, mlm_logits=mlm_logits)
    rewrite.apply(gm, "lora", rank=4)
    assert gm.info.modules_to_save == ["cls"]
    trainable = [name for name, param in gm.named_parameters() if param.requires_grad and ".lora_" not in name]
    assert trainable == ["cls.predictions.bias", "cls.predictions.transform.dense.weight",
                         "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
                         "cls.predictions.transform.LayerNorm.bias"]


def test_exported_onnx_matches_torch(tiny_mlm_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=MULTI, aggregation="log-softmax")
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx")
    assert report.output_names == ["logits"]
    sess = runtime.session(tmp_path / "model.onnx")
    for texts in (TEXTS, ["one more [MASK] example"]):
        inputs, _ = _inputs(tiny_mlm_dir, texts)
        with torch.no_grad():
            expected = gm(**inputs).logits
        got = torch.from_numpy(runtime.run(sess, inputs)["logits"])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_archive_round_trip_keeps_the_verbalizer(tiny_mlm_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=MULTI)
    rewrite.save(gm, tmp_path / "v.pt2")
    loaded = rewrite.load(tmp_path / "v.pt2")
    inputs, _ = _inputs(tiny_mlm_dir)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, gm(**inputs).logits, atol=0, rtol=0)


def test_label_word_the_tokenizer_splits_is_an_error(tiny_mlm_dir):
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    with pytest.raises(RewriteError, match=r"label word 'wonderfulness' \(label 'positive'\) is not a single token: "
                                           r"the tokenizer splits it into 'wonderful' \+ '##ness'"):
        rewrite.apply(gm, "verbalizer", labels={"negative": ["bad"], "positive": ["wonderfulness"]})


def test_labels_file_errors_name_file_and_line(tiny_mlm_dir, tmp_path):
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    bad = tmp_path / "labels.yaml"
    bad.write_text("negative: [bad]\npositive: []\n")
    with pytest.raises(RewriteError, match=rf"{bad} line 2: label 'positive' needs a word or a non-empty list"):
        rewrite.apply(gm, "verbalizer", labels=str(bad))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"negative": ["bad"], "positive": ["good", "meh"]}, indent=1))
    with pytest.raises(RewriteError, match=rf"{split}: label word 'meh' .* splits it into 'me' \+ '##h'"):
        rewrite.apply(gm, "verbalizer", labels=str(split))


def test_a_pvp_files_labels_section_is_a_labels_file(tiny_mlm_dir, tmp_path):
    pvps = tmp_path / "pvps.yaml"
    pvps.write_text('labels:\n  "0": [bad]\n  "1": [good, great]\npvps:\n  - pattern: "{text_a} It was [MASK] ."\n')
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=str(pvps))
    assert gm.info.label_words["words"] == {"0": ["bad"], "1": ["good", "great"]}


@pytest.mark.parametrize("options,message", [
    ({}, "the verbalizer needs labels"),
    ({"labels": SINGLE, "aggregation": "sum"}, "aggregation 'sum' is not known; use one of mean, log-softmax"),
    ({"labels": SINGLE, "mlm_head": "random"}, "mlm_head 'random' is not known"),
    ({"labels": {"only": ["good"]}}, "a verbalizer needs at least two labels"),
    ({"labels": SINGLE, "mask_token": "[NOPE]"}, "mask token '\\[NOPE\\]' is not in the tokenizer's vocabulary"),
])
def test_bad_options_are_clear_errors(tiny_mlm_dir, options, message):
    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    with pytest.raises(RewriteError, match=message):
        rewrite.apply(gm, "verbalizer", **options)


def test_graph_without_mlm_head_is_an_error(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir)
    with pytest.raises(RewriteError, match="needs a masked-LM graph, but this graph's task is 'seq-cls'"):
        rewrite.apply(gm, "verbalizer", labels=SINGLE)


def test_cli_apply_with_labels_file(tiny_mlm_dir, tmp_path):
    (tmp_path / "labels.yaml").write_text("negative: [bad, terrible]\npositive: [good]\n")
    rewrite_cli = [sys.executable, "-c", "from rewrite.cli.main import main; main()"]
    subprocess.run([*rewrite_cli, "capture", str(tiny_mlm_dir), "--task", "masked-lm", "-o", str(tmp_path / "m.pt2")],
                   check=True, capture_output=True)
    done = subprocess.run([*rewrite_cli, "apply", str(tmp_path / "m.pt2"), "--pass", "verbalizer", "--labels",
                           str(tmp_path / "labels.yaml"), "-o", str(tmp_path / "v.pt2")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "verbalizer over 2 labels, 3 label words (mean)" in " ".join(done.stderr.split())
    gm = rewrite.load(tmp_path / "v.pt2")
    inputs, _ = _inputs(tiny_mlm_dir)
    assert gm(**inputs).logits.shape == (3, 2)
    failed = subprocess.run([*rewrite_cli, "apply", str(tmp_path / "m.pt2"), "--pass", "verbalizer", "--labels",
                             str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x.pt2")],
                            capture_output=True, text=True)
    message = " ".join(failed.stderr.split())  # the console wraps long lines
    assert failed.returncode == 2 and f"labels file '{tmp_path / 'missing.yaml'}' does not exist" in message
