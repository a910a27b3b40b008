"""The architecture x pass support matrix: tiny random configs of every architecture family, which
passes each supports, and the one sentence a pass says where it cannot. `test_matrix.py` checks every
cell against PEFT or a hand computation; `support_table.py` runs it and writes the README table."""
from __future__ import annotations

from dataclasses import dataclass, field

import transformers as tf

VOCAB = 128
TINY = dict(vocab_size=VOCAB)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0, **TINY)
_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=1, **TINY)


@dataclass(frozen=True)
class Arch:
    """One architecture: its tiny config, the tasks it is captured for, and the inputs it takes."""

    name: str
    config: object
    tasks: tuple[str, ...]
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    right_pad: bool = False  # positions are numbered from the ids (RoBERTa): compare with PEFT on right padding
    unsupported: dict[str, str] = field(default_factory=dict)  # pass -> the sentence the pass says


SEQ2SEQ = "is not supported: it is an encoder-decoder model, whose decoder inputs PEFT prompts too"
SEQ2SEQ_UNSUPPORTED = {"prompt": SEQ2SEQ, "p_tuning_adapter": SEQ2SEQ}

ARCHS = [
    Arch("LLaMA", tf.LlamaConfig(num_key_value_heads=2, **_DECODER), ("causal-lm",)),
    Arch("Mistral", tf.MistralConfig(num_key_value_heads=2, **_DECODER), ("causal-lm",)),
    Arch("Qwen2", tf.Qwen2Config(num_key_value_heads=2, **_DECODER), ("causal-lm",)),
    Arch("Phi-3", tf.Phi3Config(num_key_value_heads=4, bos_token_id=0, eos_token_id=0, **_DECODER), ("causal-lm",)),
    Arch("Gemma", tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **_DECODER), ("causal-lm",)),
    Arch("GPT-2", tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                                **TINY), ("causal-lm",)),
    Arch("OPT", tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0,
                             eos_token_id=0, **TINY), ("causal-lm",)),
    Arch("BLOOM", tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **TINY), ("causal-lm",)),
    Arch("GPT-NeoX", tf.GPTNeoXConfig(**_DECODER), ("causal-lm",)),
    Arch("Falcon", tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **TINY), ("causal-lm",)),
    Arch("GPT-J", tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0,
                                eos_token_id=0, **TINY), ("causal-lm",)),
    Arch("BERT", tf.BertConfig(**_ENCODER), ("seq-cls", "masked-lm"), ("input_ids", "attention_mask", "token_type_ids")),
    Arch("RoBERTa", tf.RobertaConfig(type_vocab_size=1, **{**_ENCODER, "max_position_embeddings": 80}),
         ("seq-cls", "masked-lm"), right_pad=True),
    Arch("DistilBERT", tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
                                           pad_token_id=1, **TINY), ("seq-cls", "masked-lm")),
    Arch("DeBERTa-v2", tf.DebertaV2Config(**_ENCODER, type_vocab_size=0), ("seq-cls", "masked-lm")),
    Arch("ELECTRA", tf.ElectraConfig(embedding_size=32, **_ENCODER), ("seq-cls", "masked-lm"),
         ("input_ids", "attention_mask", "token_type_ids")),
    Arch("ALBERT", tf.AlbertConfig(embedding_size=16, **_ENCODER), ("masked-lm",),
         ("input_ids", "attention_mask", "token_type_ids")),
    Arch("T5", tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0, **TINY),
         ("seq2seq-lm",), ("input_ids", "attention_mask", "decoder_input_ids"), unsupported=SEQ2SEQ_UNSUPPORTED),
    Arch("BART", tf.BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64,
                               **TINY), ("seq2seq-lm",), ("input_ids", "attention_mask", "decoder_input_ids"),
         unsupported=SEQ2SEQ_UNSUPPORTED),
]

PASSES = {
    "lora": "LoRA",
    "lora_embedding": "LoRA on embeddings + LM head",
    "lora_int4": "LoRA over an int4 base",
    "dora": "DoRA",
    "ia3": "IA³",
    "pissa": "PiSSA",
    "prompt": "prompt tuning",
    "p_tuning_adapter": "PEFT P-tuning adapter",
    "ptuning": "P-tuning (template)",
    "verbalizer": "verbalizer",
}


def applies(name: str, task: str) -> bool:
    """The verbalizer turns a masked LM into a classifier; every other pass applies to every task."""
    return name != "verbalizer" or task == "masked-lm"


def cells() -> list[tuple[Arch, str, str]]:
    return [(arch, task, name) for arch in ARCHS for task in arch.tasks for name in PASSES if applies(name, task)]


def cell_id(arch: Arch, task: str, name: str) -> str:
    return f"{arch.name}-{task}-{name}"


START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def render(passed: dict[str, bool]) -> str:
    """The README table: `yes` where the cell's test passed, `no` (the pass refuses, with its reason) where
    the refusal's test passed, `FAILS` where the test failed, and a dash where the pass does not apply."""
    lines = [f"| architecture | task | {' | '.join(PASSES.values())} |", "|---|---|" + "---|" * len(PASSES)]
    for arch in ARCHS:
        for task in arch.tasks:
            row = []
            for name in PASSES:
                key = cell_id(arch, task, name)
                if not applies(name, task):
                    row.append("-")
                elif not passed.get(key, False):
                    row.append("FAILS")
                else:
                    row.append(f"no ({arch.unsupported[name].removeprefix('is not supported: ')})"
                               if name in arch.unsupported else "yes")
            lines.append(f"| {arch.name} | {task} | {' | '.join(row)} |")
    return "\n".join([START, *lines, END])
