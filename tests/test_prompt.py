"""Prompt tuning: PEFT's PROMPT_TUNING outputs on LLaMA and BERT, masked LMs (which PEFT cannot do)
against the `inputs_embeds` reference, stripped outputs, initializations, ONNX, training, the CLI,
and bad input."""
from __future__ import annotations

import copy
import logging
import shutil
import subprocess

import pytest
import torch
from torch import fx
from peft import PromptTuningConfig, get_peft_model

import rewrite
from rewrite.errors import RewriteError
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.graph.query import model_input
from rewrite.adapters.prompt_table import TABLE
from rewrite.training.train import TrainConfig, evaluate, prepended_positions, task_loss, train

BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
LLAMA_INPUTS = ["input_ids", "attention_mask"]
COUNT = 5


def capture(model, names: list[str], labels: bool = False):
    inputs = example_inputs(names, 128, batch=2, seq=8)
    if labels:
        inputs["labels"] = inputs["input_ids"].clone()
    return rewrite.capture(copy.deepcopy(model), inputs)


def fresh(names: list[str], labels: bool = False) -> dict[str, torch.Tensor]:
    """Another shape than the capture's, a left-padded row, mixed token types, some ignored labels."""
    inputs = example_inputs(names, 128, batch=3, seq=11, seed=5, pad=True)
    if "token_type_ids" in inputs:
        inputs["token_type_ids"][:, 6:] = 1
    if labels:
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def randomize_table(gm, seed: int = 1) -> torch.Tensor:
    table = gm.get_parameter(TABLE)
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
    return table.detach()


def peft_twin(model, gm, task_type: str):
    """PEFT's prompt tuning over a copy of `model`, with `gm`'s prompt embeddings."""
    peft_model = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=task_type, num_virtual_tokens=COUNT))
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.copy_(gm.get_parameter(TABLE))
    return peft_model.eval()


def embeds_reference(model, table: torch.Tensor, inputs: dict[str, torch.Tensor]):
    """What prompt tuning means, written out: the table in front of the word embeddings, masks extended."""
    batch = inputs["input_ids"].shape[0]
    words = model.get_input_embeddings()(inputs["input_ids"])
    extended = {
        "inputs_embeds": torch.cat([table.expand(batch, -1, -1), words], 1),
        "attention_mask": torch.cat([torch.ones(batch, COUNT, dtype=torch.long), inputs["attention_mask"]], 1),
    }
    if "token_type_ids" in inputs:
        extended["token_type_ids"] = torch.cat([torch.zeros(batch, COUNT, dtype=torch.long), inputs["token_type_ids"]], 1)
    with torch.no_grad():
        return model(**extended).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2's lookup reads view(input_ids, [-1, seq])
def test_causal_lm_matches_peft_logits_and_loss_with_labels(make_tiny, arch):
    model = make_tiny(arch, "causal-lm")
    gm = capture(model, LLAMA_INPUTS, labels=True)
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    randomize_table(gm)
    reference = peft_twin(model, gm, "CAUSAL_LM")
    inputs = fresh(LLAMA_INPUTS, labels=True)
    with torch.no_grad():
        ours, theirs = gm(**inputs), reference(**inputs)
    assert ours.logits.shape == (3, 11 + COUNT, 128)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)


def test_sequence_classifier_matches_peft_with_token_types_and_head(make_tiny):
    model = make_tiny("bert", "seq-cls")
    gm = capture(model, BERT_INPUTS)
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    randomize_table(gm)
    reference = peft_twin(model, gm, "SEQ_CLS")
    ours = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    assert ours == ["classifier.bias", "classifier.weight", TABLE]  # PEFT's SEQ_CLS trains the head too
    inputs = fresh(BERT_INPUTS)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-5)


def test_masked_lm_equals_the_inputs_embeds_reference_and_strips_to_the_input_length(make_tiny):
    model = make_tiny("bert", "masked-lm")
    full, stripped = capture(model, BERT_INPUTS), capture(model, BERT_INPUTS)
    rewrite.apply(full, "prompt", num_virtual_tokens=COUNT)
    rewrite.apply(stripped, "prompt", num_virtual_tokens=COUNT, strip_virtual=True)
    table = randomize_table(full)
    stripped.get_parameter(TABLE).data.copy_(table)
    inputs = fresh(BERT_INPUTS)
    expected = embeds_reference(model, table, inputs)
    with torch.no_grad():
        torch.testing.assert_close(full(**inputs).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(stripped(**inputs).logits, expected[:, COUNT:], rtol=0, atol=1e-5)


def test_stripped_causal_lm_keeps_the_in_graph_loss_and_aligns_logits(make_tiny):
    model = make_tiny("llama", "causal-lm")
    full, stripped = capture(model, LLAMA_INPUTS, labels=True), capture(model, LLAMA_INPUTS, labels=True)
    rewrite.apply(full, "prompt", num_virtual_tokens=COUNT)
    rewrite.apply(stripped, "prompt", num_virtual_tokens=COUNT, strip_virtual=True)
    stripped.get_parameter(TABLE).data.copy_(randomize_table(full))
    inputs = fresh(LLAMA_INPUTS, labels=True)
    with torch.no_grad():
        whole, cut = full(**inputs), stripped(**inputs)
    assert cut.logits.shape == inputs["input_ids"].shape + (128,)
    torch.testing.assert_close(cut.logits, whole.logits[:, COUNT:], rtol=0, atol=0)
    torch.testing.assert_close(cut.loss, whole.loss, rtol=0, atol=0)


def test_text_init_copies_the_texts_token_rows_repeated_to_fill(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    ids = gm.info.tokenizer("classify the sentiment")["input_ids"]  # [CLS] ... [SEP], as PEFT tokenizes
    rewrite.apply(gm, "prompt", num_virtual_tokens=len(ids) + 2, init_text="classify the sentiment")
    words = gm.get_parameter("bert.embeddings.word_embeddings.weight")
    torch.testing.assert_close(gm.get_parameter(TABLE), words[ids + ids[:2]], rtol=0, atol=0)
    assert gm.info.history[-1]["report"]["init"] == "text"


def test_init_text_longer_than_the_prompt_is_cut_and_said(tiny_bert_dir, caplog):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    ids = gm.info.tokenizer("classify the sentiment of this review")["input_ids"]
    with caplog.at_level(logging.WARNING, logger="rewrite"):
        rewrite.apply(gm, "prompt", num_virtual_tokens=3, init_text="classify the sentiment of this review")
    words = gm.get_parameter("bert.embeddings.word_embeddings.weight")
    torch.testing.assert_close(gm.get_parameter(TABLE), words[ids[:3]], rtol=0, atol=0)
    assert f"has {len(ids)} tokens, more than the 3 virtual tokens" in caplog.text


def test_vocab_init_samples_rows_of_the_word_embeddings(make_tiny):
    gm = capture(make_tiny("llama", "causal-lm"), LLAMA_INPUTS)
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT, prompt_init="vocab")
    table, words = gm.get_parameter(TABLE), gm.get_parameter("model.embed_tokens.weight")
    assert all((words == row).all(-1).any() for row in table)


def test_onnx_keeps_the_base_inputs_and_matches_torch(make_tiny, tmp_path):
    from rewrite import runtime

    for arch, task, names in (("llama", "causal-lm", LLAMA_INPUTS), ("bert", "seq-cls", BERT_INPUTS)):
        gm = capture(make_tiny(arch, task), names)
        rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
        randomize_table(gm)
        report = rewrite.export_onnx(gm, tmp_path / f"{arch}.onnx")
        assert report.input_names == names and report.max_abs_diff <= 1e-4
        inputs = example_inputs(names, 128, batch=4, seq=13, seed=7, pad=True)
        got = runtime.run(runtime.session(tmp_path / f"{arch}.onnx"), inputs)["logits"]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), gm(**inputs).logits, rtol=0, atol=1e-4)


def test_rewrite_run_reads_a_prompt_tuned_masked_lm_at_the_users_mask(tiny_mlm_dir, tmp_path):
    from rewrite.runtime.predict import predict

    gm = rewrite.load_pretrained(tiny_mlm_dir, task="masked-lm")
    rewrite.apply(gm, "prompt", num_virtual_tokens=3)
    randomize_table(gm)
    rewrite.export_onnx(gm, tmp_path / "mlm.onnx")
    texts = ["the movie was [MASK] .", "[MASK] is what it was , and long"]
    tokenizer = gm.info.tokenizer
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = gm(**inputs).logits[:, 3:]  # the user's positions follow the 3 virtual ones
    at_mask = logits[inputs["input_ids"] == tokenizer.mask_token_id].softmax(-1)
    for row, predictions in enumerate(predict(tmp_path / "mlm.onnx", texts, top_k=3)):
        expected = at_mask[row].topk(3)
        assert [token for token, _ in predictions] == tokenizer.convert_ids_to_tokens(expected.indices.tolist())
        torch.testing.assert_close(torch.tensor([p for _, p in predictions]), expected.values, rtol=0, atol=1e-5)


def test_position_limit_is_checked_when_applied_and_when_run(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")  # 128 positions
    with pytest.raises(RewriteError, match="128 virtual tokens leave no room for input in the model's 128 positions"):
        rewrite.apply(gm, "prompt", num_virtual_tokens=128)
    rewrite.apply(gm, "prompt", num_virtual_tokens=10)
    gm(**example_inputs(BERT_INPUTS, 128, batch=2, seq=118))
    with pytest.raises(RuntimeError, match="allow at most 118; truncate the input"):
        gm(**example_inputs(BERT_INPUTS, 128, batch=2, seq=119))


def test_later_passes_find_the_extended_inputs(make_tiny):
    gm = capture(make_tiny("bert", "masked-lm"), BERT_INPUTS)
    assert model_input(gm, "input_ids").op == "placeholder"
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    inputs = fresh(BERT_INPUTS)
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.run(*(inputs[name] for name in BERT_INPUTS))
    virtual = torch.arange(128, 128 + COUNT).expand(3, COUNT)
    ones = torch.ones(3, COUNT, dtype=torch.long)
    expected = {"input_ids": torch.cat([virtual, inputs["input_ids"]], 1),
                "attention_mask": torch.cat([ones, inputs["attention_mask"]], 1),
                "token_type_ids": torch.cat([ones * 0, inputs["token_type_ids"]], 1)}
    for name in BERT_INPUTS:
        torch.testing.assert_close(interpreter.env[model_input(gm, name)], expected[name], rtol=0, atol=0)


def test_training_loss_of_unstripped_outputs_matches_peft_causal_lm(make_tiny):
    """PEFT prepends -100 labels for the virtual tokens; the last virtual position predicts the first token."""
    model = make_tiny("llama", "causal-lm")
    gm = capture(model, LLAMA_INPUTS)
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    randomize_table(gm)
    assert prepended_positions(gm) == COUNT
    reference = peft_twin(model, gm, "CAUSAL_LM")
    inputs = fresh(LLAMA_INPUTS, labels=True)
    labels = inputs.pop("labels")
    with torch.no_grad():
        ours = task_loss(gm(**inputs), {"labels": labels}, "causal-lm", prepended_positions(gm))
        theirs = reference(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_masked_lm_loss_of_unstripped_outputs_reads_the_input_positions(make_tiny):
    model = make_tiny("bert", "masked-lm")
    gm = capture(model, BERT_INPUTS)
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    inputs = fresh(BERT_INPUTS)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, [2, 7]] = inputs["input_ids"][:, [2, 7]]
    with torch.no_grad():
        outputs = gm(**inputs)
        ours = task_loss(outputs, {"labels": labels}, "masked-lm", prepended_positions(gm))
    by_hand = torch.nn.functional.cross_entropy(outputs.logits[:, COUNT:][:, [2, 7]].flatten(0, 1),
                                                labels[:, [2, 7]].flatten())
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-6)
    with pytest.raises(RewriteError, match="logits have 16 positions for 11 input tokens \\(0 prepended"):
        task_loss(outputs, {"labels": labels}, "masked-lm")


@pytest.mark.parametrize("strip_virtual", [True, False])
def test_training_only_the_prompt_lowers_the_loss(prompt_lm_dir, strip_virtual):
    gm = rewrite.load_pretrained(prompt_lm_dir, task="causal-lm")
    base = {n: p.detach().clone() for n, p in gm.named_parameters()}
    torch.manual_seed(0)
    rewrite.apply(gm, "prompt", num_virtual_tokens=8, prompt_init="vocab", strip_virtual=strip_virtual)
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [TABLE]
    rows = [{"text": "the cat sat on the mat"}, {"text": "the dog sat on the log and slept"}] * 8
    before = evaluate(gm, rows, config=TrainConfig(progress=False))["loss"]
    result = train(gm, rows, eval_data=rows, config=TrainConfig(epochs=4, lr=0.1, batch_size=4, progress=False))
    assert result.eval["loss"] < before - 2.0
    assert all(torch.equal(p, base[n]) for n, p in gm.named_parameters() if n in base)


def test_cli_apply_prompt_with_init_text(tiny_bert_dir, tmp_path):
    command = [shutil.which("rewrite"), "apply", str(tiny_bert_dir), "--pass", "prompt", "--num-virtual-tokens", "4",
               "--init-text", "classify the sentiment", "-o", str(tmp_path / "prompt.pt2")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prompt: 4 virtual tokens prepended (text init)" in " ".join(done.stderr.split())  # rich wraps lines
    gm = rewrite.load(tmp_path / "prompt.pt2")
    assert gm.get_parameter(TABLE).shape == (4, 32)


def test_bad_input_is_one_clear_sentence(make_tiny):
    gm = capture(make_tiny("llama", "causal-lm"), LLAMA_INPUTS)
    with pytest.raises(RewriteError, match="num_virtual_tokens 0 is not allowed"):
        rewrite.apply(gm, "prompt", num_virtual_tokens=0)
    with pytest.raises(RewriteError, match="prompt_init 'text' needs init_text"):
        rewrite.apply(gm, "prompt", prompt_init="text")
    with pytest.raises(RewriteError, match="the graph has no tokenizer to tokenize init_text"):
        rewrite.apply(gm, "prompt", init_text="hello")
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    with pytest.raises(RewriteError, match="already has prompt embeddings .from pass prompt."):
        rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    inputs = example_inputs(LLAMA_INPUTS, 128)
    inputs["position_ids"] = torch.arange(8).expand(2, 8)
    with_positions = rewrite.capture(make_tiny("llama", "causal-lm"), inputs)
    with pytest.raises(RewriteError, match="cannot extend the graph input 'position_ids'"):
        rewrite.apply(with_positions, "prompt", num_virtual_tokens=COUNT)
