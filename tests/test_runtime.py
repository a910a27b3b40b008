"""The serving runtime where importing torch or transformers fails (a serving install): prediction on a
classifier, a P-tuned and a PVP model, generation with the cache, one adapter file active and mixed adapters
give what the same calls give in this process, and what torch, Hugging Face or each adapter's folded export
give. The generation tests are slow: their models take five exports with a cache."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import transformers

import rewrite
from rewrite.errors import RewriteError
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.predict import predict
from rewrite.runtime.schema import ModelSchema, slot_defaults
from rewrite.runtime.slots import Slot

from no_torch import NO_TORCH
from test_adapter_cache import MIXED_INDEX, MIXED_TEXTS, STEPS, build, ours
from test_kv_cache import TEXTS as PROMPTS, hf_generate
from test_serving_encoding import PATTERN, TEXTS

SERVE = NO_TORCH + """
import json
import numpy as np
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.generate import generate
from rewrite.runtime.predict import predict

def call(kind, model, texts, tokenizer=None, adapters=None):
    if kind == "predict":
        return predict(model, texts, tokenizer_dir=tokenizer, top_k=2)
    done = generate(model, texts, max_new_tokens=STEPS, eos=[], keep_logits=True, adapters=Adapters(**adapters))
    return {"tokens": done.token_ids.tolist(), "logits": np.stack(done.logits, 1).tolist(), "texts": done.texts}

print(json.dumps({name: call(**spec) for name, spec in json.loads(input()).items()}))
"""


@pytest.fixture(scope="module")
def classifier(tiny_bert_dir, tmp_path_factory):
    """A seq-cls export and torch's probabilities for TEXTS, tokenized by transformers."""
    gm = rewrite.load_pretrained(tiny_bert_dir, task="seq-cls")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        expected = gm(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    path = tmp_path_factory.mktemp("classifier") / "model.onnx"
    rewrite.export_onnx(gm, path)
    return path, expected


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A cached LLaMA export with adapter slots, its mixed export, two adapter files and their folded exports."""
    return build("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def predictions(classifier, ptuned_model, pvp_model, tiny_bert_dir, headless_dir):
    return {
        "classifier": dict(kind="predict", model=str(classifier[0]), texts=TEXTS, tokenizer=str(tiny_bert_dir)),
        "ptuned": dict(kind="predict", model=str(ptuned_model[0]), texts=TEXTS, tokenizer=str(tiny_bert_dir)),
        "pvp": dict(kind="predict", model=str(pvp_model[0]), texts=TEXTS, tokenizer=str(headless_dir)),
    }


@pytest.fixture(scope="module")
def generations(llama):
    files = [str(f) for f in llama.files]
    return {
        "cached": dict(kind="generate", model=str(llama.model("slots")), texts=PROMPTS, adapters={}),
        "active": dict(kind="generate", model=str(llama.model("slots")), texts=PROMPTS,
                       adapters={"active": files[1]}),
        "mixed": dict(kind="generate", model=str(llama.model("mixed")), texts=MIXED_TEXTS,
                      adapters={"stacked": files, "index": MIXED_INDEX}),
    }


def _without_torch(calls: dict) -> dict:
    """Every call's result from one interpreter in which torch and transformers cannot be imported."""
    done = subprocess.run([sys.executable, "-c", f"STEPS = {STEPS}\n" + SERVE], input=json.dumps(calls) + "\n",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def predicted(predictions):
    return _without_torch(predictions)


@pytest.fixture(scope="module")
def generated(generations):
    return _without_torch(generations)


def _here(spec: dict):
    """The same call in this process (torch and transformers importable)."""
    if spec["kind"] == "predict":
        return [[list(pair) for pair in row] for row in predict(spec["model"], spec["texts"],
                                                                 tokenizer_dir=spec["tokenizer"], top_k=2)]
    return ours(spec["model"], spec["texts"], Adapters(**spec["adapters"]))


def _same_generation(served: dict, tokens: np.ndarray, logits: np.ndarray, atol: float) -> None:
    np.testing.assert_array_equal(np.asarray(served["tokens"]), tokens)
    assert np.abs(np.asarray(served["logits"], dtype=np.float32) - logits).max() <= atol


@pytest.mark.parametrize("name, reference", [("classifier", "classifier"), ("ptuned", "ptuned_model"),
                                             ("pvp", "pvp_model")])
def test_predictions_without_torch_are_this_process_and_torch(predicted, predictions, name, reference, request):
    assert predicted[name] == _here(predictions[name])
    expected = request.getfixturevalue(reference)[1]
    for probabilities, top in zip(expected, predicted[name]):
        for label, probability in top:
            assert probability == pytest.approx(float(probabilities[int(label.removeprefix("LABEL_"))]), abs=1e-5)


@pytest.mark.slow
def test_cached_generation_without_torch_is_this_process_and_hf_generate(generated, generations, llama):
    here = _here(generations["cached"])
    _same_generation(generated["cached"], here.token_ids, np.stack(here.logits, 1), 1e-6)
    assert generated["cached"]["texts"] == here.texts
    tokens, logits = hf_generate(transformers.AutoModelForCausalLM.from_pretrained(llama.directory).eval())
    _same_generation(generated["cached"], tokens[:, :STEPS], logits[:, :STEPS], 1e-4)


@pytest.mark.slow
def test_an_active_adapter_file_without_torch_generates_as_its_folded_export(generated, generations, llama):
    here = _here(generations["active"])
    _same_generation(generated["active"], here.token_ids, np.stack(here.logits, 1), 1e-6)
    folded = ours(llama.folded[1])
    _same_generation(generated["active"], folded.token_ids, np.stack(folded.logits, 1), 1e-4)


@pytest.mark.slow
def test_mixed_adapters_without_torch_generate_each_row_as_its_folded_export(generated, generations, llama):
    here = _here(generations["mixed"])
    _same_generation(generated["mixed"], here.token_ids, np.stack(here.logits, 1), 1e-6)
    alone = [ours(path, MIXED_TEXTS) for path in llama.folded]
    for row, number in enumerate(MIXED_INDEX):
        got = {"tokens": generated["mixed"]["tokens"][row], "logits": generated["mixed"]["logits"][row]}
        _same_generation(got, alone[number].token_ids[row], np.stack(alone[number].logits, 1)[row], 1e-4)


def test_the_schema_reads_what_the_export_wrote(pvp_model, classifier):
    pvp, plain = ModelSchema.read(pvp_model[0]), ModelSchema.read(classifier[0])
    assert (pvp.task, pvp.encoding, pvp.prepended) == ("seq-cls", {"kind": "pattern", "pattern": PATTERN}, 0)
    assert (plain.task, plain.encoding, plain.labels) == ("seq-cls", None, {0: "LABEL_0", 1: "LABEL_1"})
    assert plain.max_positions == 128 and plain.cache is plain.slots is plain.special_ids is None


def test_a_file_that_is_not_an_onnx_model_is_one_sentence(tmp_path):
    (tmp_path / "model.onnx").write_text("not a model")
    with pytest.raises(RewriteError, match=r"^'[^']*model\.onnx' is not an ONNX model \(\w+\); give the \.onnx file "
                                           r"that `rewrite export` wrote$"):
        ModelSchema.read(tmp_path / "model.onnx")


def test_a_model_file_is_parsed_once_until_it_changes(classifier, tmp_path, monkeypatch):
    """Parsing reads every inline weight (seconds and the model's size in memory on a large model), and serving
    asks for the metadata several times: once per version of the file."""
    path = tmp_path / "model.onnx"
    shutil.copy(classifier[0], path)
    parses = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: parses.append(args[0]) or real(*args, **kwargs))
    for _ in range(3):
        assert ModelSchema.read(path).task == "seq-cls" and slot_defaults(path) == {}
    assert len(parses) == 1
    model = real(str(path))
    model.metadata_props.add(key="rewrite.task", value="masked-lm")
    onnx.save(model, str(path))
    assert ModelSchema.read(path).task == "masked-lm" and len(parses) == 2


@pytest.mark.slow
def test_the_schema_reads_a_cached_mixed_export(llama):
    schema = ModelSchema.read(llama.model("mixed"))
    assert schema.task == "causal-lm" and schema.cache.layers == 2
    assert not schema.cache.position_ids and schema.cache.padding == "right"  # lowered: GroupQueryAttention numbers them
    assert schema.special_ids["eos_token_id"] and schema.slots.mixed and schema.slots.max_rank == 64
    assert schema.slots.fingerprint == ModelSchema.read(llama.model("slots")).slots.fingerprint
    assert {s.group for s in schema.slots.slots} == {name.rsplit(".", 2)[0] for name in schema.slots.by_name()}


def test_slots_of_models_exported_before_slots_declared_their_defaults_still_read():
    old = Slot.from_json({"name": "model.layers.0.q_proj.lora_A.weight", "shape": [None, 8], "dtype": "float32",
                          "kind": "lora_a"})
    assert (old.empty, old.group, old.shape) == ("zeros", "model.layers.0.q_proj", (None, 8))
    head = Slot.from_json({"name": "score.weight", "shape": [2, 8], "dtype": "float32", "kind": "tensor"})
    assert (head.empty, head.group) == ("current", None)
