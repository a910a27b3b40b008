"""The runtime's tokenizer (`rewrite.runtime.tokenizer`, tokenizers without transformers) against
transformers' `AutoTokenizer` on the same saved directory: ids, masks, offsets, padding on either side,
tokens and decoded text, for WordPiece (MiniLM's real tokenizer), GPT-2-style byte-level BPE, a
LLaMA/SentencePiece-style BPE, and the tests' byte and word tokenizers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rewrite.errors import RewriteError
from rewrite.runtime.tokenizer import Tokenizer as RuntimeTokenizer

from test_kv_cache import byte_tokenizer
from test_matrix import word_tokenizer

TEXTS = ["Hello, world! It isn't over.", "the movie was great", "  spaces   and\ttabs ", "café naïve 東京 🙂",
         "bad", ""]
CORPUS = ["the cat sat on the mat", "hello world, it isn't over yet", "a great movie was shown", "café naïve"] * 20


def _gpt2_style() -> transformers.PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _llama_style() -> transformers.PreTrainedTokenizerFast:
    """SentencePiece-style: `▁` for spaces, byte fallback, `<s>` put before each text."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=[f"<0x{i:02X}>" for i in range(256)]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", padding_side="left")


def _saved(tokenizer, directory) -> tuple[object, RuntimeTokenizer]:
    tokenizer.save_pretrained(directory)
    return (transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True),
            RuntimeTokenizer.from_pretrained(directory))


@pytest.fixture(params=["minilm", "gpt2-style", "llama-style", "byte", "word", "word-bpe"])
def pair(request, minilm_dir, tmp_path):
    if request.param == "minilm":
        return (transformers.AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True),
                RuntimeTokenizer.from_pretrained(minilm_dir))
    build = {"gpt2-style": _gpt2_style, "llama-style": _llama_style, "byte": byte_tokenizer,
             "word": lambda: word_tokenizer(SimpleNamespace(name="BERT")),
             "word-bpe": lambda: word_tokenizer(SimpleNamespace(name="RoBERTa"))}[request.param]
    return _saved(build(), tmp_path)


def test_encodings_match_transformers(pair):
    hf, ours = pair
    for special in (True, False):
        for text in TEXTS:
            want = hf(text, add_special_tokens=special, return_offsets_mapping=True)
            got = ours(text, add_special_tokens=special, return_offsets_mapping=True)
            assert got["input_ids"] == want["input_ids"]
            assert got["attention_mask"] == want["attention_mask"]
            assert [tuple(o) for o in got["offset_mapping"]] == [tuple(o) for o in want["offset_mapping"]]
            assert ours.tokenize(text) == hf.tokenize(text)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_transformers(pair, side):
    hf, ours = pair
    if hf.pad_token_id is None:
        hf.pad_token_id = ours.pad_token_id = 0
    hf.padding_side = ours.padding_side = side
    texts = [t for t in TEXTS if t]
    want = hf(texts, padding=True, return_tensors="np")
    got = ours(texts, padding=True, return_tensors="np")
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got[name], want[name])
    assert got["input_ids"].dtype == np.int64


def test_decoding_and_lookups_match_transformers(pair):
    hf, ours = pair
    rows = [hf(t)["input_ids"] for t in TEXTS[:3]]
    width = min(map(len, rows))
    for skip in (True, False):
        assert ours.batch_decode([r[:width] for r in rows], skip_special_tokens=skip) == hf.batch_decode(
            [r[:width] for r in rows], skip_special_tokens=skip)
        for row in rows:
            assert ours.decode(np.asarray(row), skip_special_tokens=skip) == hf.decode(row, skip_special_tokens=skip)
    assert ours.convert_ids_to_tokens(rows[0]) == hf.convert_ids_to_tokens(rows[0])
    assert ours.convert_ids_to_tokens(rows[0][0]) == hf.convert_ids_to_tokens(rows[0][0])
    for kind in ("pad", "eos", "bos", "unk", "mask"):
        assert getattr(ours, f"{kind}_token_id") == getattr(hf, f"{kind}_token_id"), kind
        assert getattr(ours, f"{kind}_token") == getattr(hf, f"{kind}_token"), kind
    assert ours.model_max_length == hf.model_max_length
    assert ours.padding_side == hf.padding_side


def test_a_directory_without_tokenizer_json_says_what_to_pass(tmp_path):
    with pytest.raises(RewriteError, match=r"^no tokenizer\.json in .*; pass --tokenizer with [^;]*$"):
        RuntimeTokenizer.from_pretrained(tmp_path)
