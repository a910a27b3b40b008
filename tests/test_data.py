"""Data: the three file formats, validation with file and line, truncation, per-batch padding, sharding."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

import rewrite
from rewrite.training import data
from rewrite.training.data import Fields, collate, encode, epoch_order, read_examples, shard
from rewrite.errors import RewriteError

NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_csv_and_tsv_read_the_same_rows(tmp_path):
    rows = [("it 's \"great\" , truly", "1"), ('a "bad" one', "0"), ("fine", "positive")]
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    csv_file = write(tmp_path / "d.csv", "text,label\n" + "".join('"' + t.replace('"', '""') + f'",{y}\n' for t, y in rows))
    tsv = write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))

    read = [read_examples(p, task="seq-cls", label_names=NAMES) for p in (jsonl, csv_file, tsv)]

    for examples in read:
        assert [(e.text, e.label) for e in examples] == [(rows[0][0], 1), (rows[1][0], 0), ("fine", 1)]
    assert [e.where for e in read[2]] == [f"{tsv}:2", f"{tsv}:3", f"{tsv}:4"]


def test_shipped_sst2_sample_and_dev_set():
    folder = Path(rewrite.__file__).parent / "data"
    train = read_examples(folder / "sst2_train_2000.tsv", task="seq-cls", fields=Fields(text="sentence"),
                          label_names=NAMES)
    dev = read_examples(folder / "sst2_dev.tsv", task="seq-cls", fields=Fields(text="sentence"), label_names=NAMES)
    assert (len(train), len(dev)) == (2000, 872)
    assert sum(e.label for e in dev) == 444
    assert dev[0].text == "it 's a charming and often affecting journey . "


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", "\n".join([
        json.dumps({"text": "ok", "label": 1}),
        json.dumps({"label": 0}),
        json.dumps({"text": "  ", "label": 0}),
        json.dumps({"text": "x", "label": "maybe"}),
        "{not json",
        json.dumps({"text": "x", "label": 7}),
    ]) + "\n")
    with pytest.raises(RewriteError) as error:
        read_examples(path, task="seq-cls", label_names=NAMES)
    message = str(error.value)
    assert message.startswith(f"5 bad row(s) in {path} (")
    for expected in [f"{path}:2: field 'text' is missing", f"{path}:3: field 'text' is empty",
                     f"{path}:4: label 'maybe' is not known", f"{path}:5: not valid JSON",
                     f"{path}:6: label 7 is outside 0..1"]:
        assert expected in message
    assert "negative, positive" in message


def test_tsv_rows_with_the_wrong_column_count_and_missing_labels(tmp_path):
    path = write(tmp_path / "bad.tsv", "sentence\tlabel\nfine\t1\nno label here\nempty label\t\n")
    with pytest.raises(RewriteError, match=r"bad.tsv:3: 1 columns where the header has 2.*bad.tsv:4: field 'label' is missing"):
        read_examples(path, task="seq-cls", fields=Fields(text="sentence"), label_names=NAMES)


def test_empty_data_unknown_format_and_missing_file_are_errors(tmp_path):
    with pytest.raises(RewriteError, match="holds no rows"):
        read_examples(write(tmp_path / "empty.jsonl", "\n"), task="seq-cls", label_names=NAMES)
    with pytest.raises(RewriteError, match="holds no rows"):
        read_examples(write(tmp_path / "header.tsv", "text\tlabel\n"), task="seq-cls", label_names=NAMES)
    with pytest.raises(RewriteError, match="unknown format; use .jsonl, .csv or .tsv"):
        read_examples(write(tmp_path / "data.parquet", ""), task="seq-cls", label_names=NAMES)
    with pytest.raises(RewriteError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl", task="causal-lm")


def test_soft_labels_and_pairs(tmp_path):
    rows = [{"a": "x", "b": "y", "label": [0.25, 0.75]}, {"a": "p", "b": "q", "label": 0}]
    examples = read_examples(rows, task="seq-cls", fields=Fields(text="a", pair="b"), label_names=NAMES)
    assert [(e.text, e.pair, e.label, e.where) for e in examples] == [
        ("x", "y", (0.25, 0.75), "row 1"), ("p", "q", 0, "row 2")]
    with pytest.raises(RewriteError, match=r"row 1: soft label \[0.5, 0.2, 0.3\] is not 2 non-negative"):
        read_examples([{"text": "x", "label": [0.5, 0.2, 0.3]}], task="seq-cls", label_names=NAMES)


def test_language_modeling_needs_text_only():
    examples = read_examples([{"text": "hello there"}], task="causal-lm")
    assert examples[0].label is None


def test_truncation_is_counted_and_logged(tokenizer, caplog):
    examples = read_examples([{"text": "word " * 50}, {"text": "short"}], task="causal-lm")
    with caplog.at_level(logging.WARNING, logger="rewrite.training.data"):
        encoded = encode(examples, tokenizer, max_length=16)
    assert encoded.truncated == 1
    assert [len(f["input_ids"]) for f in encoded.features] == [16, 3]
    assert "1 of 2 examples were longer than 16 tokens" in caplog.text


def test_batches_are_padded_to_their_own_longest_row(tokenizer):
    examples = read_examples([{"text": "a b c d e f g", "label": 1}, {"text": "a", "label": 0},
                              {"text": "b c", "label": 1}], task="seq-cls", label_names=NAMES)
    encoded = encode(examples, tokenizer, max_length=64)
    names = ["input_ids", "token_type_ids", "attention_mask"]
    short = collate(encoded, [1, 2], tokenizer, "seq-cls", names)
    assert short["input_ids"].shape == (2, 4)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert short["labels"].tolist() == [0, 1]
    expected = tokenizer(["a", "b c"], padding=True, return_tensors="pt")
    for name in names:
        assert torch.equal(short[name], expected[name])


def test_causal_lm_labels_ignore_padding_and_masked_lm_masks_reproducibly(tokenizer):
    examples = read_examples([{"text": "one two three four five six"}, {"text": "one"}], task="causal-lm")
    encoded = encode(examples, tokenizer, max_length=64)
    names = ["input_ids", "attention_mask"]
    causal = collate(encoded, [0, 1], tokenizer, "causal-lm", names)
    assert torch.equal(causal["labels"], causal["input_ids"].masked_fill(causal["attention_mask"] == 0, -100))

    masked = [collate(encoded, [0, 1] * 20, tokenizer, "masked-lm", names, range(3, 43)) for _ in range(2)]
    assert torch.equal(masked[0]["input_ids"], masked[1]["input_ids"])
    labels, original = masked[0]["labels"], causal["input_ids"].repeat(20, 1)
    targets = labels != -100
    assert torch.equal(labels[targets], original[targets])
    assert not targets[original == tokenizer.cls_token_id].any() and not targets[causal["attention_mask"].repeat(20, 1) == 0].any()
    assert (masked[0]["input_ids"][targets] == tokenizer.mask_token_id).float().mean() > 0.5
    alone = collate(encoded, [1] * 20, tokenizer, "masked-lm", names, range(4, 43, 2))  # no neighbour, no padding
    assert alone["input_ids"].shape == (20, 3) and (alone["labels"] != -100).any()
    assert torch.equal(alone["input_ids"], masked[0]["input_ids"][1::2, :3])
    assert torch.equal(alone["labels"], masked[0]["labels"][1::2, :3])


def test_shards_split_each_global_batch_like_one_big_batch():
    lengths, world, batch = [5] * 10, 2, 3
    order = epoch_order(lengths, world, batch, seed=1, epoch=0)
    shards = [shard(order, rank, world) for rank in range(world)]
    assert sorted(order) == list(range(10))
    for k in range(data.micro_batches_per_epoch(len(lengths), world, batch)):
        together = data.batches(order, batch * world)[k]
        assert sorted(i for s in shards for i in data.batches(s, batch)[k]) == sorted(together)
    assert epoch_order(lengths, world, batch, seed=1, epoch=1) != order
    assert epoch_order(lengths, world, batch, seed=1, epoch=0) == order


def test_grouping_by_length_cuts_padding_and_keeps_every_example_once():
    lengths = [int(x) for x in torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0))]
    padded = lambda order: sum(max(lengths[i] for i in b) * len(b) for b in data.batches(order, 16))  # noqa: E731
    random_order = epoch_order(lengths, 2, 8, seed=0, epoch=0)
    grouped = epoch_order(lengths, 2, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(grouped) == list(range(500))
    assert padded(grouped) < 0.6 * padded(random_order)
    assert grouped == epoch_order(lengths, 2, 8, seed=0, epoch=0, group_by_length=True)
    assert grouped != epoch_order(lengths, 2, 8, seed=0, epoch=1, group_by_length=True)
