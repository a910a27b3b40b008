"""ONNX Runtime GenAI runs our cached exports from the directory the export writes: `genai_config.json`'s fields
on a lowered LLaMA, a lowered GPT-2 (which keeps `position_ids`) and a prompt-tuned export; where
`onnxruntime_genai` imports, GenAI's greedy tokens equal `rewrite.generate`'s (batch 1 and a right-padded batch 2,
with and without an adapter file through `og.Adapters`), and `og.Tokenizer`'s ids equal Hugging Face's on a
byte-level and a SentencePiece-style BPE."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import rewrite
from rewrite.errors import RewriteError
from rewrite.export.genai import CONFIG
from rewrite.export.onnx_adapters import export_adapter
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.generate import generate

from helpers import randomize_lora
from test_kv_cache import TEXTS, byte_tokenizer, tiny_lm
from test_lowering import CONFIGS

NEW_TOKENS = 12
EOS = 256  # the byte tokenizer's <eos>, its padding too


def _config(path) -> dict:
    return json.loads((path.parent / CONFIG).read_text())


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """`(arch, slotted)` -> the cached export's path (a slotted one with `a.onnx_adapter`, a trained LoRA), once."""
    made = {}

    def make(arch: str, slotted: bool = False):
        if (arch, slotted) not in made:
            tmp = tmp_path_factory.mktemp(f"{arch}{'-slots' if slotted else ''}")
            tiny_lm(arch, CONFIGS[arch]() if arch in CONFIGS else None).save_pretrained(tmp / "hf")
            byte_tokenizer().save_pretrained(tmp / "hf")
            gm = rewrite.load_pretrained(tmp / "hf")
            path = tmp / "onnx" / "model.onnx"
            if slotted:
                rewrite.apply(gm, "lora", rank=4, alpha=8)
                randomize_lora(gm)
            rewrite.export_onnx(gm, path, cache=True, adapter_slots=slotted)
            if slotted:
                rewrite.save(gm, tmp / "trained.pt2")
                export_adapter(tmp / "trained.pt2", path.parent / "a.onnx_adapter", path)
            made[arch, slotted] = path
        return made[arch, slotted]
    return make


def test_lowered_llama_config_shares_the_buffer_and_takes_no_position_ids(export):
    path = export("llama")
    config = _config(path)
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "llama" and model["vocab_size"] == 257 and model["context_length"] == 2048
    assert model["eos_token_id"] == [EOS] and model["pad_token_id"] == EOS and "bos_token_id" not in model
    assert decoder["filename"] == "model.onnx" and "sliding_window" not in decoder
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"], decoder["num_hidden_layers"],
            decoder["num_key_value_heads"]) == (16, 64, 4, 2, 2)
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert config["search"] | {"past_present_share_buffer": None} == {
        "diversity_penalty": 0.0, "do_sample": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        "early_stopping": True, "max_length": 2048, "min_length": 0, "past_present_share_buffer": None}
    assert config["search"]["past_present_share_buffer"] is True
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in path.parent.iterdir()}


def test_lowered_gpt2_config_takes_position_ids_and_shares_the_buffer(export):
    config = _config(export("gpt2"))
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "decoder"  # GenAI's "gpt2" type reads one combined key-value tensor per layer
    assert model["context_length"] == 64 and config["search"]["max_length"] == 64
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"], decoder["num_hidden_layers"],
            decoder["num_key_value_heads"]) == (16, 64, 4, 2, 4)
    assert config["search"]["past_present_share_buffer"] is True


def test_prompt_tuned_export_keeps_separate_buffers(tmp_path):
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(tmp_path / "hf")
    gm = rewrite.load_pretrained(tmp_path / "hf")
    rewrite.apply(gm, "prompt", num_virtual_tokens=3)
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", cache=True)
    config = _config(tmp_path / "model.onnx")
    assert report.genai_config == tmp_path / CONFIG
    assert config["search"]["past_present_share_buffer"] is False and "position_ids" not in config["model"]["decoder"]["inputs"]


def test_a_mixed_adapter_export_writes_no_genai_config(tmp_path, caplog):
    """GenAI does not feed the per-row `adapter_index` (it fails on the missing input), so no config claims it runs."""
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(tmp_path / "hf")
    gm = rewrite.load_pretrained(tmp_path / "hf")
    rewrite.apply(gm, "lora", rank=4, alpha=8)
    report = rewrite.export_onnx(gm, tmp_path / "model.onnx", cache=True, mixed_adapters=True)
    assert report.genai_config is None and not (tmp_path / CONFIG).exists()
    assert "adapter_index, which GenAI does not feed" in caplog.text


def _until_eos(tokens) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def _genai_tokens(og, path, rows: list[list[int]], adapter: bool) -> list[list[int]]:
    """GenAI's greedy continuation of each row, the batch right-padded with the padding id as GenAI pads it."""
    model = og.Model(str(path.parent))
    length = max(map(len, rows))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + NEW_TOKENS, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(path.parent / "a.onnx_adapter"), "a")
        generator.set_active_adapter(adapters, "a")
    generator.append_tokens(np.array([row + [EOS] * (length - len(row)) for row in rows], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [_until_eos(generator.get_sequence(i)[length:]) for i in range(len(rows))]


def _ours(path, batch: list[int], adapters: Adapters | None = None) -> list[list[int]]:
    ours = generate(path, [TEXTS[i] for i in batch], max_new_tokens=NEW_TOKENS, eos=[], adapters=adapters)
    return [_until_eos(tokens) for tokens in ours.token_ids]


@pytest.mark.slow
@pytest.mark.parametrize("arch, adapter", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True),
                                           ("mistral", False)])
def test_genai_generates_the_tokens_rewrite_generates(arch, adapter, export):
    """LLaMA, Mistral and GPT-2 lowered (a shared buffer; Mistral's window of 4 inside the op, none in the config;
    GPT-2's positions fed as `position_ids`); the adapter file active in both runtimes, and changing the tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    path = export(arch, slotted=adapter)
    rows = [byte_tokenizer()(text).input_ids for text in TEXTS]
    adapters = Adapters(active=str(path.parent / "a.onnx_adapter")) if adapter else None
    for batch in ([0], [0, 1]):
        want = _ours(path, batch, adapters)
        assert _genai_tokens(og, path, [rows[i] for i in batch], adapter) == want
        assert len(set(want[0])) > 3  # the text is not one repeated token
        assert not adapter or want != _ours(path, batch)


def _sentencepiece_style() -> transformers.PreTrainedTokenizerFast:
    """A LLaMA-style tokenizer (Metaspace, byte fallback, merges with consistent ranks) built offline."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    pieces = ["▁", "H", "e", "l", "o", "w", "r", "d", ",", "▁H", "ll", "llo", "▁w", "or", "ld", "▁wor", "▁world",
              "▁He", "▁Hello"]
    vocab |= {piece: len(vocab) + i for i, piece in enumerate(pieces)}
    merges = [("▁", "H"), ("l", "l"), ("ll", "o"), ("▁", "w"), ("o", "r"), ("l", "d"), ("▁w", "or"), ("▁wor", "ld"),
              ("▁H", "e"), ("▁He", "llo")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return transformers.LlamaTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", add_bos_token=False)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_genai_tokenizer_encodes_as_hugging_face(kind, export, tmp_path):
    """GenAI decodes the SentencePiece-style ids with the leading space that HF's `Strip` decoder removes."""
    og = pytest.importorskip("onnxruntime_genai")
    source = export("llama").parent
    for name in ("model.onnx", CONFIG):
        shutil.copy(source / name, tmp_path)
    tokenizer = byte_tokenizer() if kind == "byte-level" else _sentencepiece_style()
    tokenizer.save_pretrained(tmp_path)
    theirs = og.Tokenizer(og.Model(str(tmp_path)))
    for text in ["Hello world, ünï", "world Hello", *TEXTS]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert [int(i) for i in theirs.encode(text)] == ids
        decoded = theirs.decode(np.array(ids, dtype=np.int32))
        assert (decoded if kind == "byte-level" else decoded.removeprefix(" ")) == tokenizer.decode(ids)


def test_an_existing_genai_config_is_refused_without_overwrite(tmp_path):
    tiny_lm("llama", CONFIGS["llama"]()).save_pretrained(tmp_path / "hf")
    (tmp_path / CONFIG).write_text("{}")
    with pytest.raises(RewriteError, match=f"already holds {CONFIG}, which this export would replace"):
        rewrite.export_onnx(rewrite.load_pretrained(tmp_path / "hf"), tmp_path / "model.onnx", cache=True, overwrite=False)
    assert (tmp_path / CONFIG).read_text() == "{}" and not (tmp_path / "model.onnx").exists()
