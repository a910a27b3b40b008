"""Serving encodes text from the model's metadata as data: a P-tuned and a PVP model score the same in a
fresh process that never imports the passes as with them imported (and as torch), and an encoding the
runtime does not know is refused, never skipped."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
import torch

import rewrite
from rewrite.training import templates
from rewrite.text.examples import Example
from rewrite.errors import RewriteError
from rewrite.text.labels import PVP
from rewrite.runtime.predict import predict

TEXTS = ["a gorgeous , witty film", "dull and tedious, and far too long for what it has to say"]
TEMPLATE = "[P] [P] {text} [P] [MASK] ."
PATTERN = "Just [MASK] ! {text_a}"
WORDS = {"0": ["terrible"], "1": ["great"]}
FRESH = """
import json, sys
from rewrite.runtime.predict import predict
scores = predict(sys.argv[1], json.loads(sys.argv[2]), tokenizer_dir=sys.argv[3], top_k=2)
print(json.dumps({"scores": scores, "passes": any(m.startswith("rewrite.passes") for m in sys.modules)}))
"""


def _fresh_predict(model, tokenizer_dir) -> list[list[tuple[str, float]]]:
    """`predict` in a new interpreter that imports only `rewrite.runtime.predict`."""
    done = subprocess.run([sys.executable, "-c", FRESH, str(model), json.dumps(TEXTS), str(tokenizer_dir)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert not result["passes"], "the fresh process imported the passes"
    return [[tuple(pair) for pair in row] for row in result["scores"]]


def _check_served(model, tokenizer_dir, expected: torch.Tensor) -> None:
    """A fresh process scores exactly as this one (passes imported), and both as torch."""
    served = predict(model, TEXTS, tokenizer_dir=str(tokenizer_dir), top_k=2)
    assert _fresh_predict(model, tokenizer_dir) == served
    for probabilities, predictions in zip(expected, served):
        for label, probability in predictions:
            assert probability == pytest.approx(float(probabilities[int(label.removeprefix("LABEL_"))]), abs=1e-5)


def build_ptuned(tiny_bert_dir, directory):
    """A P-tuned classifier exported to `directory`, and torch's probabilities for TEXTS."""
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    torch.manual_seed(0)
    rewrite.apply(gm, "ptuning", template=TEMPLATE, placeholders=["[unused1]", "[unused2]", "[unused3]"],
                  encoder="mlp")
    rewrite.apply(gm, "fold")
    with torch.no_grad():
        expected = gm(**templates.encode_batch(gm, TEXTS)).logits.softmax(-1)
    path = directory / "model.onnx"
    rewrite.export_onnx(gm, path)
    return path, expected


def build_pvp(headless_dir, directory):
    """A PVP model (pattern and label words on a masked LM) exported to `directory`, and torch's probabilities."""
    gm = rewrite.load_pretrained(headless_dir, task="masked-lm")
    rewrite.apply(gm, "verbalizer", labels=WORDS, pattern=PATTERN)
    tokenizer = gm.info.tokenizer
    rendered = [PVP("p", PATTERN, WORDS).render(Example(text, None, None, "row"), tokenizer, 128) for text in TEXTS]
    with torch.no_grad():
        expected = gm(**tokenizer(rendered, padding=True, return_tensors="pt")).logits.softmax(-1)
    path = directory / "model.onnx"
    rewrite.export_onnx(gm, path)
    return path, expected


def test_a_pvp_model_carries_its_pattern_as_data(pvp_model):
    props = {p.key: p.value for p in onnx.load(str(pvp_model[0])).metadata_props}
    assert json.loads(props["rewrite.encoding"]) == {"kind": "pattern", "pattern": PATTERN}


def test_a_ptuned_model_serves_alike_without_the_passes(ptuned_model, tiny_bert_dir):
    _check_served(ptuned_model[0], tiny_bert_dir, ptuned_model[1])


def test_a_pvp_model_serves_alike_without_the_passes(pvp_model, headless_dir):
    _check_served(pvp_model[0], headless_dir, pvp_model[1])


def _with_metadata(source, target, **changes: str | None):
    """A copy of the model `source` with metadata keys set (or removed, for None)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props} | changes
    onnx.helper.set_model_props(model, {key: value for key, value in props.items() if value is not None})
    onnx.save(model, str(target))
    return target


def test_a_model_exported_before_encodings_were_data_still_reads_its_template(ptuned_model, tiny_bert_dir, tmp_path):
    old = _with_metadata(ptuned_model[0], tmp_path / "old.onnx", **{
        "rewrite.encoding": None, "rewrite.template": TEMPLATE, "rewrite.placeholder_ids": "[2, 3, 4]"})
    assert predict(old, TEXTS, tokenizer_dir=str(tiny_bert_dir)) == predict(ptuned_model[0], TEXTS,
                                                                            tokenizer_dir=str(tiny_bert_dir))


@pytest.mark.parametrize("encoding, words", [
    ('{"kind": "soundex", "table": [1, 2]}', "text encoding 'soundex'"),
    ('{"kind": "template", "template": "[P] {text}"}', "'placeholder_ids'"),
    ('{"kind": "template", "template": "[P] {text} [P]", "placeholder_ids": [2]}', "2 [P] slots but 1"),
    ('{"kind": "pattern", "pattern": 7}', "'pattern'"),
    ('{"kind": "template", "template": "{text} [MASK]", "placeholder_ids": []}', "lacks a [P] slot"),
    ("not json", "not a JSON object"),
])
def test_an_encoding_the_runtime_cannot_apply_is_refused_in_one_sentence(pvp_model, headless_dir, tmp_path,
                                                                         encoding, words):
    model = _with_metadata(pvp_model[0], tmp_path / "unknown.onnx", **{"rewrite.encoding": encoding})
    with pytest.raises(RewriteError) as refused:
        predict(model, TEXTS, tokenizer_dir=str(headless_dir))
    message = str(refused.value)
    assert words in message and str(model) in message and "\n" not in message and message.count(". ") == 0
