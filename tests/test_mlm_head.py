"""`rewrite mlm-head`: a checkpoint without MLM-head weights gets a fitted head, written as a directory
Hugging Face loads with nothing missing and whose masked-LM outputs are the fitted graph's."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

import rewrite
from rewrite.text.examples import Example
from rewrite.errors import RewriteError
from rewrite.recipes import mlm_head
from helpers import run_cli, sentiment_rows


def _texts(count: int, seed: int) -> list[Example]:
    return [Example(row["text"], None, None, f"row {i}") for i, row in enumerate(sentiment_rows(count, seed))]


def _config(**changes) -> rewrite.TrainConfig:
    return dataclasses.replace(mlm_head.default_training(), max_steps=60, batch_size=16, lr=0.1, schedule="constant",
                               **changes)


@pytest.fixture(scope="module")
def headless_roberta_dir(tmp_path_factory, minilm_dir):
    """A bare RoBERTa encoder (no `lm_head` weights), saved in shards so the index path is exercised."""
    directory = tmp_path_factory.mktemp("headless-roberta")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=160, pad_token_id=0,
                                        architectures=["RobertaModel"])
    transformers.RobertaModel(config).save_pretrained(directory, max_shard_size="500KB")
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(directory)
    assert (directory / mlm_head.INDEX).is_file()
    return directory


@pytest.mark.parametrize("fixture", ["headless_dir", "headless_roberta_dir"])
def test_fitted_head_lowers_the_loss_and_loads_back_exactly(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    fit = mlm_head.fit_head(model_dir, _texts(400, 0), _texts(60, 1), _config())
    assert fit.after.loss < fit.before.loss - 1.0
    assert fit.after.accuracy > fit.before.accuracy
    assert any(".bias" in name for name in fit.parameters)  # the decoder's own bias trains; its tied weight does not
    out = mlm_head.write_model_dir(fit, model_dir, tmp_path / "fitted")

    model, loading = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"]
    batch = dict(fit.graph.info.tokenizer(["the movie was great", "a sad day"], padding=True,
                                             return_tensors="pt"))
    with torch.no_grad():
        fit.graph.eval()
        ours = fit.graph(**batch).logits
        theirs = model.eval()(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert json.loads((out / "mlm_head.json").read_text())["after"]["loss"] == fit.after.loss

    encoder = transformers.AutoModel.from_pretrained(out).eval()  # every original tensor is kept
    original = transformers.AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch).last_hidden_state, original(**batch).last_hidden_state,
                                   atol=0, rtol=0)


def test_cli_fits_reports_and_refuses_to_overwrite(headless_dir, tmp_path):
    data = tmp_path / "unlabeled.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{row['text']}\t{row['label']}\n" for row in sentiment_rows(300, 3)))
    out = tmp_path / "fitted"
    args = ["mlm-head", headless_dir, "--data", data, "--text-field", "sentence", "-o", out, "--held-out", "40",
            "--max-steps", "30", "--lr", "0.1", "--batch-size", "16", "--no-progress"]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "held-out texts before" in done.stdout and "held-out texts after" in done.stdout
    report = json.loads((out / "mlm_head.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"] and report["steps"] == 30
    assert transformers.AutoConfig.from_pretrained(out).architectures == ["BertForMaskedLM"]

    before = sorted(p.name for p in out.iterdir())
    again = run_cli(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_inputs_are_one_sentence(headless_dir, tmp_path):
    with pytest.raises(RewriteError, match="held-out"):
        mlm_head.split_held_out(_texts(10, 0), 10, 0)
    (tmp_path / "config.json").write_text((headless_dir / "config.json").read_text())
    fit = mlm_head.HeadFit(None, [], mlm_head.Score(1.0, 0.0), mlm_head.Score(1.0, 0.0), 0)
    with pytest.raises(RewriteError, match="safetensors"):
        mlm_head.write_model_dir(fit, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_held_out_errors_name_the_flag_and_small_data_trains_by_default(headless_dir, tmp_path):
    data = tmp_path / "small.tsv"
    data.write_text("sentence\n" + "".join(f"{row['text']}\n" for row in sentiment_rows(30, 4)))
    args = ["mlm-head", headless_dir, "--data", data, "--text-field", "sentence", "--max-steps", "2", "--no-progress"]
    for held_out, words in (("0", "--held-out 0 leaves no held-out text"), ("30", "--held-out 30 needs more than 30")):
        done = run_cli(*args, "--held-out", held_out, "-o", tmp_path / f"out-{held_out}")
        assert done.returncode == 2 and words in done.stderr and "'text'" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / f"out-{held_out}").exists()
    done = run_cli(*args, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "on 3 held-out texts before" in done.stdout  # a tenth of 30 rows, not 1000
