"""PET: PVP files and their errors, pattern-only truncation, PET's ensemble and distillation formulas,
the auxiliary MLM loss, iPET's training sets, the whole recipe, and `rewrite pet`."""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import rewrite
from rewrite import runtime
from rewrite.text import labels
from rewrite.recipes import pet
from rewrite.text.examples import Example
from rewrite.training.data import Fields
from rewrite.errors import RewriteError
from rewrite.graph.ir import info

DATA = Path(__file__).parent / "data" / "pet"
FIELDS = Fields(text="sentence")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def pvps():
    return labels.load_pvps(DATA / "pvps.yaml")


def _quick(**changes) -> pet.PetConfig:
    """Tiny-model settings: few epochs, a learning rate that fits 8 examples."""
    config = pet.PetConfig(**changes)
    config.pattern_training = dataclasses.replace(config.pattern_training, epochs=30, lr=1e-2, batch_size=4)
    config.final_training = dataclasses.replace(config.final_training, max_steps=None, epochs=2, lr=1e-2,
                                               batch_size=8)
    return config


def test_pvp_file_is_read_in_order_with_shared_labels(pvps):
    assert [(p.name, p.pattern) for p in pvps] == [("it-was", "{text_a} It was [MASK] ."),
                                                   ("just", "Just [MASK] ! {text_a}")]
    assert all(p.labels == {"0": ["terrible"], "1": ["great"]} for p in pvps)


@pytest.mark.parametrize("entry,message", [
    ('pattern: "{text_a} It was ."', r"pvps.yaml line 5: pattern '\{text_a\} It was \.' has no \[MASK\]; a pattern "
                                     "needs exactly one"),
    ('pattern: "[MASK] {text_a} [MASK]"', r"pvps.yaml line 5: pattern .* has 2 \[MASK\]"),
    ('pattern: "{text_a} {text_c} [MASK]"', r"pvps.yaml line 5: .* has unknown slot \{text_c\}"),
    ('pattern: "It was [MASK] ."', r"pvps.yaml line 5: .* has no \{text_a\} slot"),
    ('pattern: "{text_a} [MASK]"\n    labels: {"1": [great], "0": [bad]}',
     r"pvps.yaml line 5: PVP 'p2' has labels 1, 0 but 'first' has 0, 1"),
])
def test_bad_pvp_files_name_file_and_line(tmp_path, entry, message):
    path = tmp_path / "pvps.yaml"
    path.write_text('labels: {"0": [terrible], "1": [great]}\npvps:\n  - name: first\n    pattern: "{text_a} [MASK]"\n'
                    f"  - {entry}\n")
    with pytest.raises(RewriteError, match=message):
        labels.load_pvps(path)


def test_label_word_the_tokenizer_splits_names_the_pvp_line(tmp_path, tokenizer):
    path = tmp_path / "pvps.json"
    path.write_text('{"pvps": [\n {"pattern": "{text_a} It was [MASK] .",\n'
                    '  "labels": {"0": ["mediocre"], "1": ["great"]}}]}\n')
    with pytest.raises(RewriteError, match=rf"{path} line 2: label word 'mediocre' \(label '0'\) is not a single "
                                           r"token: "
                                           r"the tokenizer splits it into 'med' \+ '##io' \+ '##cre'"):
        labels.check_label_words(labels.load_pvps(path), tokenizer)


def test_unknown_data_label_names_file_and_line(tmp_path, pvps):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbad film\t2\n")
    with pytest.raises(RewriteError, match=rf"{path}:3: label 2 is outside 0..1"):
        pet.read_data(path, pvps, FIELDS, labeled=True)


def test_truncation_shortens_only_the_text_and_keeps_the_mask(tokenizer):
    pvp = labels.PVP("pair", "{text_a} ? [MASK] , {text_b}", {"0": ["no"], "1": ["yes"]})
    long_a, short_b = "word " * 50, "a short second text"
    text = pvp.render(Example(long_a, short_b, 1, "row 1"), tokenizer, max_length=24)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 24 and ids.count(tokenizer.mask_token_id) == 1
    assert text.endswith("? [MASK] , a short second text")  # PET's rule: the longer slot loses the tokens
    both = pvp.render(Example(long_a, long_a, 1, "row 1"), tokenizer, max_length=24)
    assert len(tokenizer(both)["input_ids"]) == 24
    assert both == "word " * 9 + "word ? [MASK] , " + "word " * 8 + "word"  # 10 + 9: ties cut text_b, as in PET
    fits = pvp.render(Example("fine", "ok", 1, "row 1"), tokenizer, max_length=24)
    assert fits == "fine ? [MASK] , ok"


def test_truncation_that_would_cut_the_mask_is_an_error(tokenizer):
    pvp = labels.PVP("wordy", "{text_a} " + "the pattern is long " * 5 + "[MASK] .", {"0": ["no"], "1": ["yes"]},
                  "pvps.yaml line 7: ")
    with pytest.raises(RewriteError, match=r"pvps.yaml line 7: pattern 'wordy' alone needs 24 tokens for "
                                           r"train.tsv:3, more than max_length 16; truncation would cut the pattern "
                                           r"or its \[MASK\]"):
        pvp.render(Example("some text", None, 0, "train.tsv:3"), tokenizer, max_length=16)


def test_text_holding_the_mask_token_is_an_error(tokenizer, pvps):
    with pytest.raises(RewriteError, match=r"train.tsv:9: the text contains the mask token '\[MASK\]' itself"):
        pvps[0].render(Example("a [MASK] film", None, 0, "train.tsv:9"), tokenizer, max_length=64)


def test_merge_logits_is_pets_weighted_average():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 3, generator=generator) for _ in range(3)]
    weights = [0.5, 0.75, 0.25]
    expected = np.average(np.stack([l.numpy() for l in logits]), axis=0, weights=weights)
    torch.testing.assert_close(pet.merge_logits(logits, weights), torch.from_numpy(expected).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(pet.merge_logits(logits, weights, "mean"), torch.stack(logits).mean(0),
                               atol=1e-6, rtol=0)


def test_distillation_loss_is_pets_formula():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    temperature = 2.0
    p = F.log_softmax(student / temperature, dim=1)  # PET's distillation_loss, written out
    q = F.softmax(teacher / temperature, dim=1)
    expected = F.kl_div(p, q, reduction="sum") * temperature**2 / student.shape[0]
    outputs = transformers.modeling_outputs.SequenceClassifierOutput(logits=student)
    got = pet.distillation_loss(outputs, {"labels": q}, temperature)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_pattern_model_weight_is_training_accuracy_before_training_and_it_learns(headless_dir, pvps):
    labeled = pet.read_data(DATA / "train.tsv", pvps, FIELDS, labeled=True)
    config = _quick()
    base = pet.capture_masked_lm(headless_dir)
    tokenizer = info(base).tokenizer
    train_set = pet.patterned(pvps[0], labeled, tokenizer, 128)
    untrained = pet.pattern_graph(base, pvps[0], config, lora=True)
    before = pet.accuracy(pet.predict_logits(untrained, train_set, 8), labeled)
    model = pet.train_pattern_model(base, pvps[0], labeled, config, seed=0)
    assert model.weight == before
    assert pet.accuracy(pet.predict_logits(model.graph, train_set, 8), labeled) == 1.0


def test_auxiliary_mlm_loss_mixes_ce_and_mlm_and_is_dropped_after_training(headless_dir, pvps):
    labeled = pet.read_data(DATA / "train.tsv", pvps, FIELDS, labeled=True)
    unlabeled = pet.read_data(DATA / "unlabeled.tsv", pvps, FIELDS, labeled=False)
    base = pet.capture_masked_lm(headless_dir)
    tokenizer = info(base).tokenizer
    gm = pet.pattern_graph(base, pvps[0], _quick(), lora=True, mlm_logits=True)
    text = pet.patterned(pvps[0], unlabeled[:1], tokenizer, 128)[0].text
    pattern_mask = tokenizer(text)["input_ids"].index(tokenizer.mask_token_id)
    loss = pet.AuxiliaryMlmLoss(gm, [text] * 8, alpha=0.25, batch_size=8, seed=3)
    encoded = tokenizer([e.text for e in pet.patterned(pvps[0], labeled, tokenizer, 128)], padding=True,
                        return_tensors="pt")
    batch = {"labels": torch.tensor([e.label for e in labeled])}
    with torch.no_grad():
        outputs = gm(**encoded)
        got = loss(outputs, batch)
        replay = pet.AuxiliaryMlmLoss(gm, [text] * 8, alpha=0.25, batch_size=8, seed=3)._next_batch()
        targets = replay.pop("labels")
        mlm_logits = gm(**replay).mlm_logits
    chosen = targets != -100
    assert chosen.any() and not chosen[:, pattern_mask].any()  # the pattern's own [MASK] is never a target
    expected = 0.25 * F.cross_entropy(outputs.logits, batch["labels"]) + 0.75 * F.cross_entropy(
        mlm_logits[chosen], targets[chosen])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    model = pet.train_pattern_model(base, pvps[0], labeled, _quick(mlm_alpha=0.5), unlabeled=unlabeled, seed=0)
    assert set(model.graph(**encoded).keys()) == {"logits"}


def test_ipet_training_sets_grow_balanced_from_confident_examples(pvps):
    labeled = [Example(f"l{i}", None, i % 2, f"row {i}") for i in range(4)]
    unlabeled = [Example(f"u{i}", None, None, f"u {i}") for i in range(20)]
    logits = torch.zeros(20, 2)
    logits[:10, 0], logits[10:, 1] = 3.0, 3.0  # the first half is label 0, the rest label 1
    models = [pet.PatternModel(p, None, weight) for p, weight in zip([*pvps, pvps[0]], (0.5, 0.75, 1.0))]
    sets = pet._ipet_sets(models, [logits] * 3, labeled, unlabeled, 0, _quick(scale_factor=3.0),
                          random.Random(0), np.random.RandomState(0))
    assert len(sets) == 3
    for new in sets:
        assert len(new) == 4 * (3 - 1)
        assert sorted(e.label for e in new) == [0, 0, 0, 0, 1, 1, 1, 1]
        assert all((int(e.text[1:]) >= 10) == (e.label == 1) for e in new)
        assert len({e.text for e in new}) == len(new)


def test_pet_recipe_end_to_end(headless_dir, pvps):
    labeled = pet.read_data(DATA / "train.tsv", pvps, FIELDS, labeled=True)
    unlabeled = pet.read_data(DATA / "unlabeled.tsv", pvps, FIELDS, labeled=False)
    eval_set = pet.read_data(DATA / "eval.tsv", pvps, FIELDS, labeled=True)
    result = pet.run_pet(headless_dir, pvps, labeled, unlabeled, _quick(generations=2, scale_factor=2.0), eval_set)
    assert [[m.pvp.name for m in models] for models in result.generations] == [["it-was", "just"]] * 2
    assert all(0.0 <= m.eval_accuracy <= 1.0 for models in result.generations for m in models)
    assert result.final.info.task == "seq-cls"
    assert result.final.info.config.id2label == {0: "0", 1: "1"}
    logits = pet.predict_logits(result.final, eval_set, 16)
    assert logits.shape == (len(eval_set), 2)
    assert result.final_accuracy == pet.accuracy(logits, eval_set)
    assert json.dumps(result.summary())


def _fake_result(final: float | None, pvp_scores: list[float]) -> pet.PetResult:
    models = [pet.PatternModel(labels.PVP(f"p{i}", "{text_a} It was [MASK] .", {"0": ["bad"], "1": ["good"]}),
                               f"graph {i}", 1.0, eval_accuracy=score) for i, score in enumerate(pvp_scores)]
    return pet.PetResult([models], None, "distilled graph", final)


def test_export_choice_takes_the_best_pvp_model_only_when_it_beats_distillation():
    assert pet.exported_model(_fake_result(0.60, [0.70, 0.65]), "auto")[0] == "graph 0"
    assert pet.exported_model(_fake_result(0.72, [0.70, 0.65]), "auto")[0] == "distilled graph"
    assert pet.exported_model(_fake_result(0.72, [0.70, 0.75]), "best-pvp")[0] == "graph 1"
    assert pet.exported_model(_fake_result(0.50, [0.70]), "distilled")[0] == "distilled graph"
    assert pet.exported_model(_fake_result(None, [None]), "auto")[0] == "distilled graph"
    with pytest.raises(RewriteError, match="evaluation set"):
        pet.exported_model(_fake_result(None, [None]), "best-pvp")


def test_exported_pvp_model_serves_raw_text_through_its_pattern(headless_dir, pvps, tmp_path):
    from rewrite.runtime.predict import predict

    labeled = pet.read_data(DATA / "train.tsv", pvps, FIELDS, labeled=True)
    best = pet.train_pattern_model(pet.capture_masked_lm(headless_dir), pvps[1], labeled, _quick(), seed=1)
    texts = ["a gorgeous , witty film", "dull and tedious"]
    rows = [Example(text, None, 0, "row") for text in texts]
    expected = torch.softmax(pet.predict_logits(best.graph, pet.patterned(pvps[1], rows, info(best.graph).tokenizer,
                                                                          128), 8), dim=-1)
    rewrite.apply(best.graph, "fold")
    rewrite.export_onnx(best.graph, tmp_path / "model.onnx")
    served = predict(tmp_path / "model.onnx", texts, tokenizer_dir=str(headless_dir), top_k=2)
    for probabilities, predictions in zip(expected, served):
        for label, probability in predictions:
            assert probability == pytest.approx(float(probabilities[int(label)]), abs=1e-5)


def _rewrite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from rewrite.cli.main import main; main()", *args],
                          capture_output=True, text=True)


def test_cli_pet_trains_distills_and_exports(headless_dir, tmp_path):
    done = _rewrite("pet", "--model", str(headless_dir), "--pvp", str(DATA / "pvps.yaml"), "--train",
                    str(DATA / "train.tsv"), "--unlabeled", str(DATA / "unlabeled.tsv"),
                    "--eval", str(DATA / "eval.tsv"),
                    "--text-field", "sentence", "--output-dir", str(tmp_path), "--epochs", "2", "--final-steps", "3")
    assert done.returncode == 0, done.stderr
    assert "generation 0 it-was: train accuracy before training" in done.stdout
    assert "final classifier: eval accuracy" in done.stdout
    results_shown = [line for line in (done.stdout + done.stderr).splitlines() if not line.startswith("wrote")]
    for result in ("it-was", "ensemble", "classifier"):  # each result once, not also as a log line
        assert sum(result in line for line in results_shown) == 1, results_shown
    results = json.loads((tmp_path / "results.json").read_text())
    assert [m["pvp"] for m in results["generations"][0]] == ["it-was", "just"]
    assert results["final_steps"] == 3  # a step budget, not epochs of --unlabeled
    sess = runtime.session(tmp_path / "model.onnx")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    inputs = tokenizer(["a gorgeous film", "dull"], padding=True, return_tensors="np")
    assert runtime.run(sess, dict(inputs))["logits"].shape == (2, 2)


def test_cli_pet_zero_shot_and_ipet(tiny_mlm_dir, tmp_path):
    common = ["--model", str(tiny_mlm_dir), "--pvp", str(DATA / "pvps.yaml"), "--text-field", "sentence"]
    done = _rewrite("pet", *common, "--eval", str(DATA / "eval.tsv"), "--output-dir", str(tmp_path / "zs"),
                    "--zero-shot")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert set(results["zero_shot"]["patterns"]) == {"it-was", "just"}
    assert "zero-shot ensemble: accuracy" in done.stdout
    assert (done.stdout + done.stderr).count("zero-shot it-was") == 1
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "zs").iterdir()}
    again = _rewrite("pet", *common, "--eval", str(DATA / "eval.tsv"), "--output-dir", str(tmp_path / "zs"),
                     "--zero-shot")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert f"output directory {str(tmp_path / 'zs')!r} already holds results.json" in again.stderr
    assert "--overwrite" in again.stderr and "zero-shot" not in again.stdout  # refused before any work
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "zs").iterdir()} == written
    again = _rewrite("pet", *common, "--eval", str(DATA / "eval.tsv"), "--output-dir", str(tmp_path / "zs"),
                     "--zero-shot", "--overwrite")
    assert again.returncode == 0, again.stderr
    done = _rewrite("pet", *common, "--train", str(DATA / "train.tsv"), "--unlabeled", str(DATA / "unlabeled.tsv"),
                    "--output-dir", str(tmp_path / "ipet"), "--ipet", "--generations", "2", "--epochs", "1",
                    "--final-epochs", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "ipet" / "results.json").read_text())
    assert len(results["generations"]) == 2
    assert results["final_steps"] == 1  # --final-epochs replaces the step budget: one epoch of 16 rows


def test_cli_pet_bad_input_exits_2(tiny_mlm_dir, tmp_path):
    common = ["--model", str(tiny_mlm_dir), "--pvp", str(DATA / "pvps.yaml"), "--output-dir", str(tmp_path)]
    done = _rewrite("pet", *common, "--zero-shot")
    assert done.returncode == 2 and "--zero-shot evaluates on --eval" in done.stderr
    done = _rewrite("pet", *common, "--train", str(DATA / "train.tsv"))
    assert done.returncode == 2 and "give both (or --zero-shot)" in done.stderr
    done = _rewrite("pet", *common, "--train", str(DATA / "train.tsv"), "--unlabeled", str(DATA / "unlabeled.tsv"),
                    "--export", "best-pvp")
    assert done.returncode == 2 and "--eval" in done.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_minilm_zero_shot_verbalizer_matches_tied_embedding_cloze(minilm_dir, pvps, tmp_path):
    """On the real checkpoint (no MLM-head weights) the rewritten graph is the tied-embedding cloze:
    LayerNorm of the mask's hidden state times the label words' embeddings; ONNX agrees."""
    eval_set = pet.read_data(DATA / "eval.tsv", pvps, FIELDS, labeled=True)
    base = pet.capture_masked_lm(minilm_dir)
    tokenizer = info(base).tokenizer
    gm = pet.pattern_graph(base, pvps[0], pet.PetConfig(), lora=False)
    texts = [e.text for e in pet.patterned(pvps[0], eval_set, tokenizer, 128)]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    encoder = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        hidden = encoder(**inputs).last_hidden_state
        at_mask = hidden[torch.arange(len(texts)), (inputs["input_ids"] == tokenizer.mask_token_id).int().argmax(1)]
        normed = F.layer_norm(at_mask, at_mask.shape[-1:], eps=encoder.config.layer_norm_eps)
        words = tokenizer.convert_tokens_to_ids(["terrible", "great"])
        expected = normed @ encoder.embeddings.word_embeddings.weight[words].T
        got = gm(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    rewrite.export_onnx(gm, tmp_path / "zero-shot.onnx")
    onnx_logits = runtime.run(runtime.session(tmp_path / "zero-shot.onnx"), dict(inputs))["logits"]
    torch.testing.assert_close(torch.from_numpy(onnx_logits), got, atol=1e-4, rtol=0)
