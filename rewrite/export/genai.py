"""ONNX Runtime GenAI's `genai_config.json` for a model exported with a KV cache, written beside the model.

GenAI (`onnxruntime_genai`, and its C, C#, Java and mobile bindings) runs a decoder from a directory holding the
ONNX file, `genai_config.json` and the tokenizer's `tokenizer.json` and `tokenizer_config.json` (which the export
writes for every graph with a tokenizer). The config holds the fields GenAI's own model builder writes for its
models (onnxruntime-genai 0.18, `models/builders/base.py`, `make_genai_config`), read from what the export wrote:
the decoder's inputs as the file has them (`position_ids` only where lowering kept it), the cache's names and
sizes from its layout, the special ids and position limit from its metadata, and the search defaults from the
model's generation config.

`past_present_share_buffer` makes GenAI allocate each layer's cache once at the maximum length and the model
write new positions into it in place, which only GroupQueryAttention does: it is the layout's `in_place`, true
only where every layer was lowered onto it (a cache prefix never is). No `sliding_window` entry is written: GenAI reads one as a cache that
holds only the window (window plus slack positions per sliding layer, the attention op evicting), while our
cache keeps every position and the model applies the window itself (GroupQueryAttention's `local_window_size`,
or the exported mask). GenAI pads batched prompts on the right, as lowered models and every model without a
prefix or an unlowered window do; a model that pads on the left generates in GenAI as here at batch 1. A
mixed-adapter export and a model whose length nothing bounds get no config (`refusal` says why).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewrite.runtime.schema import ModelSchema

CONFIG = "genai_config.json"
# GenAI's language-model types (its `src/models/model_type.h`, each in the 0.18 library) that it runs as a plain
# decoder with one key and one value tensor per layer, as we export: "gpt2" selects a combined key-value cache and
# "lfm2" a hybrid one, so those models, like any type GenAI does not list, are the generic "decoder".
DECODER_TYPES = frozenset({
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gemma4_text", "gptoss", "granite", "granitemoehybrid",
    "hunyuandensev1", "internlm2", "llama", "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3", "phi3small",
    "qwen2", "qwen3", "qwen3_5_moe_text", "qwen3_5_text", "smollm3"})
# GenAI's builder's search defaults (`make_genai_config`) where the generation config sets nothing.
SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 50, "top_p": 1.0}


def model_type(config) -> str:
    """GenAI's `model.type`: the Hugging Face model type where GenAI runs that type as we export it, else the
    generic decoder (GenAI refuses a type it does not know)."""
    name = getattr(config, "model_type", "")
    return name if name in DECODER_TYPES else "decoder"


def _inputs(names: list[str]) -> dict[str, str]:
    """The decoder's inputs by GenAI's keys: `position_ids` only where the model still takes it (GenAI feeds every
    input it names)."""
    inputs = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in names}
    return inputs | {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}


def search(config, context_length: int, shared: bool) -> dict[str, Any]:
    """GenAI's search defaults: the model's generation config where it sets a value, else the builder's."""
    import transformers

    generation = transformers.GenerationConfig.from_model_config(config)
    values = {key: default if getattr(generation, key, None) is None else getattr(generation, key)
              for key, default in SEARCH_DEFAULTS.items()}
    return values | {"early_stopping": True, "max_length": context_length, "min_length": 0,
                     "past_present_share_buffer": shared}


def _special_ids(special: dict[str, Any]) -> dict[str, Any]:
    """The ids the export recorded, those it found none for left out (GenAI reads each as a number)."""
    ids = {"bos_token_id": special.get("bos_token_id"), "pad_token_id": special.get("pad_token_id")}
    return {k: v for k, v in ids.items() if v is not None} | {"eos_token_id": list(special.get("eos_token_id") or [])}


def context_length(positions: int | None, tokenizer) -> int | None:
    """The longest sequence, by which GenAI sizes its buffers: the position limit, else the tokenizer's (alibi
    models set none); None where neither bounds it."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER  # the tokenizer's "no limit"

    limit = positions or getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < VERY_LARGE_INTEGER else None


def refusal(path: Path, context_length: int | None) -> str | None:
    """Why GenAI could not run the export at `path`, or None."""
    if context_length is None:
        return "the model and its tokenizer set no longest sequence, by which GenAI sizes its buffers"
    slots = ModelSchema.read(path).slots
    if slots is not None and slots.mixed:
        return "a mixed-adapter export takes a per-row adapter_index, which GenAI does not feed"
    return None


def genai_config(path: Path, config, context_length: int, vocab: int, names: list[str]) -> dict[str, Any]:
    """The config for the exported model at `path`, whose inputs are `names`."""
    schema = ModelSchema.read(path)
    layout = schema.require_cache()
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}, "filename": path.name,
               "head_size": layout.head_dim, "hidden_size": config.hidden_size,
               "inputs": _inputs(names),
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"},
               "num_attention_heads": config.num_attention_heads, "num_hidden_layers": layout.layers,
               "num_key_value_heads": layout.kv_heads}
    model = {**_special_ids(schema.special_ids or {}), "context_length": context_length, "decoder": decoder,
             "type": model_type(config), "vocab_size": vocab}
    return {"model": model, "search": search(config, context_length, layout.in_place)}


def write(path: Path, config, context_length: int, vocab: int, names: list[str]) -> Path:
    """Writes `genai_config.json` beside the model at `path`, whose inputs are `names`; its path."""
    target = path.parent / CONFIG
    target.write_text(json.dumps(genai_config(path, config, context_length, vocab, names), indent=2) + "\n")
    return target
