"""P-tuning: the prompt encoders against the paper's own code, routing at placeholders, fold to a
constant table and ONNX without LSTM, templates, LoRA composition, training, the CLI, and bad input."""
from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import rewrite
from rewrite.training import data
from rewrite import runtime
from rewrite.training import templates
from rewrite.text.examples import pad_rows
from rewrite.cli.main import cli
from rewrite.errors import RewriteError
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.adapters.prompt_table import TABLE
from rewrite.training.train import TrainConfig, evaluate, train

from helpers import randomize_lora

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
TEMPLATE = "[P] [P] {text} [P] [MASK] ."
VOCAB = 128
RESERVED = [VOCAB, VOCAB + 1, VOCAB + 2]
UNUSED = ["[unused1]", "[unused2]", "[unused3]"]


class PaperPromptEncoder(nn.Module):
    """The P-tuning paper's PromptEncoder (THUDM/P-tuning, `prompt_encoder.py`), written out as published."""

    def __init__(self, count: int, hidden: int, lstm: bool = True):
        super().__init__()
        self.seq_indices = torch.arange(count)
        self.embedding = nn.Embedding(count, hidden)
        if lstm:
            self.lstm_head = nn.LSTM(input_size=hidden, hidden_size=hidden // 2, num_layers=2,
                                     bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self) -> torch.Tensor:
        input_embeds = self.embedding(self.seq_indices).unsqueeze(0)
        if hasattr(self, "lstm_head"):
            input_embeds = self.lstm_head(input_embeds)[0]
        return self.mlp_head(input_embeds).squeeze()


def ptuned(model, **options):
    gm = rewrite.capture(copy.deepcopy(model), example_inputs(NAMES, VOCAB))
    rewrite.apply(gm, "ptuning", template=TEMPLATE, **options)
    return gm


def reference_encoder(gm, lstm: bool) -> PaperPromptEncoder:
    """The paper's encoder carrying the graph's encoder weights (PEFT's and the paper's names are the same)."""
    count, hidden = gm.get_parameter("prompt_encoder.embedding.weight").shape
    reference = PaperPromptEncoder(count, hidden, lstm)
    state = {n.removeprefix("prompt_encoder."): p for n, p in gm.named_parameters() if n.startswith("prompt_encoder.")}
    reference.load_state_dict(state, strict=True)
    return reference


def with_placeholders(ids: list[int], seed: int = 5, batch: int = 3, seq: int = 11) -> dict[str, torch.Tensor]:
    """Fresh inputs of another shape with the three placeholders where a template puts them (and a stray one)."""
    inputs = example_inputs(NAMES, VOCAB, batch=batch, seq=seq, seed=seed, pad=True)
    inputs["input_ids"][:, 1], inputs["input_ids"][:, 2], inputs["input_ids"][:, -3] = ids
    inputs["input_ids"][0, 4] = ids[2]
    return inputs


def routed_reference(model, table: torch.Tensor, ids: list[int], inputs: dict[str, torch.Tensor]):
    """What P-tuning means, written out: each placeholder's embedding replaced by its table row."""
    tokens = inputs["input_ids"]
    embeds = model.get_input_embeddings()(tokens.clamp(max=VOCAB - 1))
    for slot, token in enumerate(ids):
        embeds = torch.where((tokens == token).unsqueeze(-1), table[slot], embeds)
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                     token_type_ids=inputs["token_type_ids"]).logits


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_encoder_equals_the_papers_architecture_with_the_same_weights(make_tiny, encoder):
    model = make_tiny("bert", "masked-lm")
    gm = ptuned(model, encoder=encoder)
    reference = reference_encoder(gm, lstm=encoder == "lstm")
    with torch.no_grad():
        table = reference()
    inputs = with_placeholders(RESERVED)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, routed_reference(model, table, RESERVED, inputs),
                                   rtol=0, atol=1e-5)
    assert inputs["input_ids"].shape == gm(**inputs).logits.shape[:2]  # the sequence length stays


def test_fold_leaves_the_encoders_output_as_a_table_and_onnx_has_no_lstm(make_tiny, tmp_path):
    model = make_tiny("bert", "masked-lm")
    gm = ptuned(model, encoder="lstm")
    with torch.no_grad():
        table = reference_encoder(gm, lstm=True)()
    inputs = with_placeholders(RESERVED)
    with torch.no_grad():
        unfolded = gm(**inputs).logits
    rewrite.apply(gm, "fold")
    assert gm.info.history[-1]["report"]["prompt_encoders"] == ["prompt_encoder"]
    torch.testing.assert_close(gm.get_parameter(TABLE), table, rtol=0, atol=1e-6)
    assert not any(n.target is torch.ops.aten.lstm.input for n in gm.graph.nodes)
    assert [n for n, _ in gm.named_parameters() if n.startswith("prompt_encoder.")] == [TABLE]
    assert gm.info.trainable == []
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, unfolded, rtol=0, atol=1e-6)

    report = rewrite.export_onnx(gm, tmp_path / "ptuned.onnx")
    assert report.input_names == NAMES
    assert "LSTM" not in {node.op_type for node in onnx.load(str(tmp_path / "ptuned.onnx")).graph.node}
    session = runtime.session(tmp_path / "ptuned.onnx")
    for shape in ((3, 11), (2, 17)):
        inputs = with_placeholders(RESERVED, seed=shape[1], batch=shape[0], seq=shape[1])
        got = torch.from_numpy(runtime.run(session, inputs)["logits"])
        with torch.no_grad():
            torch.testing.assert_close(got, gm(**inputs).logits, rtol=0, atol=1e-4)


def test_exported_model_carries_its_template_and_rewrite_run_applies_it(tiny_bert_dir, tmp_path):
    from rewrite.runtime.predict import predict

    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    torch.manual_seed(0)
    rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=UNUSED, encoder="mlp")
    rewrite.apply(gm, "fold")
    rewrite.export_onnx(gm, tmp_path / "ptuned.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "ptuned.onnx")).metadata_props}
    assert json.loads(props["rewrite.encoding"]) == {"kind": "template", "template": TEMPLATE, "placeholder_ids": [2, 3, 4]}
    texts = ["a good movie", "bad, and far too long for what it has to say"]
    with torch.no_grad():
        expected = gm(**templates.encode_batch(gm, texts)).logits.softmax(-1)
    for row, predictions in enumerate(predict(tmp_path / "ptuned.onnx", texts)):
        got = dict(predictions)
        torch.testing.assert_close(torch.tensor([got["LABEL_0"], got["LABEL_1"]]), expected[row], rtol=0, atol=1e-5)


def test_named_placeholders_without_encoder_start_as_the_base_model(tiny_bert_dir):
    base = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=UNUSED, encoder="none")
    assert sorted(n for n, p in gm.named_parameters() if p.requires_grad) == [
        "classifier.bias", "classifier.weight", TABLE]
    inputs = templates.encode_batch(gm, ["a good movie", "bad"])
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)


def test_template_ids_put_prompts_text_and_special_tokens_in_place(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=UNUSED, encoder="none")
    batch = templates.encode_batch(gm, ["a good movie", "bad"])
    cls, sep, mask, dot, pad = 101, 102, 103, 1012, 0
    a, good, movie, bad = 1037, 2204, 3185, 2919
    assert batch["input_ids"].tolist() == [[cls, 2, 3, a, good, movie, 4, mask, dot, sep],
                                           [cls, 2, 3, bad, 4, mask, dot, sep, pad, pad]]
    assert batch["attention_mask"].sum(1).tolist() == [10, 8]
    assert sorted(batch) == ["attention_mask", "input_ids", "token_type_ids"]


def test_truncation_cuts_the_text_and_keeps_the_template(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    rewrite.apply(gm, "ptuning", template=TEMPLATE, encoder="none")
    ids = templates.encode_batch(gm, ["one two three four five six"], max_length=9)["input_ids"][0].tolist()
    vocab = 30522
    assert ids == [101, vocab, vocab + 1, 2028, 2048, vocab + 2, 103, 1012, 102]


def test_placeholder_tokens_in_user_text_are_counted_and_warned(tiny_bert_dir, caplog):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=["zebra", "lion", "tiger"], encoder="none")
    with caplog.at_level(logging.WARNING, logger="rewrite"):
        templates.encode_batch(gm, ["a zebra and a lion", "a quiet day", "tiger"])
    assert "2 of 3 texts contain the template's placeholder tokens" in caplog.text


def test_lora_composes_with_ptuning_and_both_fold(make_tiny):
    model = make_tiny("bert", "seq-cls")
    gm = rewrite.capture(copy.deepcopy(model), example_inputs(NAMES, VOCAB))
    rewrite.Pipeline([("ptuning", {"template": TEMPLATE, "encoder": "mlp"}), ("lora", {"rank": 4})]).run(gm)
    randomize_lora(gm)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("prompt_encoder.")} == {
        TABLE, "prompt_encoder.mlp_head.0.weight", "prompt_encoder.mlp_head.0.bias",
        "prompt_encoder.mlp_head.2.weight", "prompt_encoder.mlp_head.2.bias"}
    assert sum(".lora_" in n for n in trainable) == 8 and {"classifier.weight", "classifier.bias"} <= trainable
    inputs = with_placeholders(RESERVED)
    with torch.no_grad():
        before = gm(**inputs).logits
    rewrite.apply(gm, "fold")
    assert gm.info.history[-1]["report"]["summary"] == "folded 4 LoRA branches and 1 prompt encoder into a constant table"
    assert not any(".lora_" in n or "mlp_head" in n for n, _ in gm.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, before, rtol=0, atol=1e-5)


def test_rewrite_train_encodes_text_through_the_template_and_lowers_the_loss(prompt_lm_dir):
    gm = rewrite.load_pretrained(prompt_lm_dir, task="causal-lm")
    torch.manual_seed(0)
    rewrite.apply(gm, "ptuning", template="[P] [P] [P] [P] {text}", encoder="lstm")
    assert all(n.startswith("prompt_encoder.") for n, p in gm.named_parameters() if p.requires_grad)
    texts = ["the cat sat on the mat", "the dog sat on the log and slept"]
    rows = [{"text": t} for t in texts] * 8
    batch = templates.encode_batch(gm, texts)
    prompt_ids = torch.tensor(gm.info.history[-1]["report"]["placeholder_ids"])
    ignored = torch.isin(batch["input_ids"], prompt_ids) | (batch["attention_mask"] == 0)
    labels = batch["input_ids"].masked_fill(ignored, -100)

    def by_hand() -> float:
        with torch.no_grad():
            logits = gm(**batch).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()

    config = TrainConfig(progress=False)
    before = evaluate(gm, rows, config=config)["loss"]
    assert before == pytest.approx(by_hand(), abs=1e-5)  # the template's text, placeholders not predicted
    result = train(gm, rows, eval_data=rows, config=TrainConfig(epochs=8, lr=1e-2, batch_size=4, progress=False))
    assert result.eval["loss"] == pytest.approx(by_hand(), abs=1e-5)
    assert result.eval["loss"] < before - 1.0


def test_training_data_keeps_placeholders_out_of_lm_targets_and_fills_pairs(tiny_bert_dir):
    gm = rewrite.load_pretrained(tiny_bert_dir, task="masked-lm")
    rewrite.apply(gm, "ptuning", template="[P] {text} [P] {text_b} [P] [MASK] .", placeholders=UNUSED, encoder="none")
    tokenizer = gm.info.tokenizer
    placeholder_ids = tokenizer.convert_tokens_to_ids(UNUSED)
    rows = [{"text": "a quiet day at the sea", "pair": "calm"}, {"text": "tiger", "pair": "a loud night"}] * 4
    examples = data.read_examples(rows, task="masked-lm", fields=data.Fields(pair="pair"))
    encoded = templates.encode_examples(gm, examples, max_length=64)
    assert tokenizer.decode(encoded.features[1]["input_ids"]) == (
        "[CLS] [unused1] tiger [unused2] a loud night [unused3] [MASK]. [SEP]")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    masked = 0
    for seed in range(20):
        batch = data.collate(encoded, range(len(rows)), tokenizer, "masked-lm", names, range(seed, seed + len(rows)))
        originally = torch.from_numpy(pad_rows([f["input_ids"] for f in encoded.features], 0, left=False))
        at_placeholders = torch.isin(originally, torch.tensor(placeholder_ids))
        assert (batch["labels"][at_placeholders] == -100).all()
        assert torch.equal(batch["input_ids"][at_placeholders], originally[at_placeholders])
        masked += int((batch["labels"] != -100).sum())
    assert masked > 0
    causal = data.collate(encoded, range(len(rows)), tokenizer, "causal-lm", names)
    assert (causal["labels"][torch.isin(causal["input_ids"], torch.tensor(placeholder_ids))] == -100).all()
    with pytest.raises(RewriteError, match="row 1: template .* has a \\{text_b\\} field but the data has no second text"):
        templates.encode_examples(gm, data.read_examples(rows, task="masked-lm"), max_length=64)


def test_cli_ptuning_with_lora_then_fold(tiny_bert_dir, tmp_path):
    apply = [shutil.which("rewrite"), "apply", str(tiny_bert_dir), "--pass", "ptuning", "--template", TEMPLATE,
             "--encoder", "mlp", "--placeholders", ",".join(UNUSED), "--pass", "lora", "-o", str(tmp_path / "a.pt2")]
    done = subprocess.run(apply, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ptuning: 3 prompt vectors at template placeholders (mlp encoder, token ids 2, 3, 4)" in " ".join(done.stderr.split())  # rich wraps lines
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(["good", "bad"] * 4)))
    trained = CliRunner().invoke(cli, ["train", str(tmp_path / "a.pt2"), "--data", str(rows), "--max-steps", "2",
                                       "--batch-size", "4", "--output-dir", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert "trained 2 steps" in trained.output
    fold = [shutil.which("rewrite"), "fold", str(tmp_path / "run" / "model.pt2"), "-o", str(tmp_path / "f.pt2")]
    done = subprocess.run(fold, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    gm = rewrite.load(tmp_path / "f.pt2")
    assert not any(".lora_" in n or "mlp_head" in n for n, _ in gm.named_parameters())
    assert gm.get_parameter(TABLE).shape == (3, 32)


def test_bad_input_is_one_clear_sentence(make_tiny, tiny_bert_dir):
    with pytest.raises(RewriteError, match="P-tuning needs a template"):
        rewrite.passes.create("ptuning")
    with pytest.raises(RewriteError, match=r"has no \[P\] placeholder"):
        rewrite.passes.create("ptuning", template="{text} [MASK] .")
    with pytest.raises(RewriteError, match="has no field for the input"):
        rewrite.passes.create("ptuning", template="[P] [MASK] .")
    with pytest.raises(RewriteError, match="prompt encoder 'gru' is not known"):
        rewrite.passes.create("ptuning", template=TEMPLATE, encoder="gru")
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    with pytest.raises(RewriteError, match="template token '<mask>' is split by the tokenizer into 3 tokens"):
        rewrite.apply(gm, "ptuning", template="[P] {text} <mask> .")
    with pytest.raises(RewriteError, match=r"the template has 3 \[P\] placeholders but 2 placeholder tokens"):
        rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=UNUSED[:2])
    with pytest.raises(RewriteError, match="placeholder token \\[nonsense\\] is not in the tokenizer's vocabulary"):
        rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=[*UNUSED[:2], "[nonsense]"])
    with pytest.raises(RewriteError, match="placeholder token \\[MASK\\] is a special token"):
        rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=[*UNUSED[:2], "[MASK]"])
    with pytest.raises(RewriteError, match="the graph has no tokenizer to look up named placeholder tokens"):
        rewrite.apply(rewrite.capture(make_tiny("bert", "masked-lm"), example_inputs(NAMES, VOCAB)), "ptuning",
                      template=TEMPLATE, placeholders=UNUSED)
    rewrite.apply(gm, "prompt", num_virtual_tokens=4)
    with pytest.raises(RewriteError, match="already has prompt embeddings"):
        rewrite.apply(gm, "ptuning", template=TEMPLATE)
