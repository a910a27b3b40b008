"""The support matrix (`matrix.py`): every pass on every architecture family. LoRA and prompt tuning
match PEFT with the same weights in both adapter directions (we save, `PeftModel.from_pretrained` loads;
PEFT saves, `rewrite.load_adapter` loads) with PEFT's trainable counts; PEFT P-tuning adapters load with
PEFT's outputs; template P-tuning equals the `inputs_embeds` computation; verbalizer scores equal the
full MLM logits at the mask. A pass that cannot support an architecture says so in one sentence naming it."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import (
    IA3Config, LoraConfig, PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA_TARGETS
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

import rewrite
from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.query import GraphQuery, module_path, word_embedding
from rewrite.graph.synthetic_inputs import example_inputs
from rewrite.graph.params import count_parameters
from rewrite.passes.prompt import TABLE

from helpers import randomize_trainable
from matrix import ARCHS, VOCAB, cell_id, cells, render

MODEL_CLASSES = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "seq-cls": transformers.AutoModelForSequenceClassification,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
}
LORA_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "masked-lm": None, "seq2seq-lm": "SEQ_2_SEQ_LM"}
PROMPT_TASK = {**LORA_TASK, "masked-lm": "FEATURE_EXTRACTION"}  # PEFT's prompting class for any model
COUNT = 4
BPE = ("RoBERTa",)  # byte-level BPE: a word after a space is its own token, `Ġword`
LABELS = {"negative": ["bad", "awful"], "positive": ["great"]}
WORDS = ["bad", "awful", "great", "movie", "the", "was"]


@pytest.fixture(scope="module")
def base():
    """`base(arch, task)`: (eager model, a fresh copy of its captured graph); each captured once per module."""
    cache = {}

    def get(arch, task):
        if (arch.name, task) not in cache:
            torch.manual_seed(0)
            model = MODEL_CLASSES[task].from_config(arch.config).eval()
            gm = rewrite.capture(copy.deepcopy(model), example_inputs(list(arch.inputs), VOCAB))
            cache[arch.name, task] = model, gm
        model, gm = cache[arch.name, task]
        return model, copy.deepcopy(gm)
    return get


def fresh(arch, pad: bool = True) -> dict[str, torch.Tensor]:
    """Another shape than the capture's, one padded row (on the right where positions follow the ids)."""
    inputs = example_inputs(list(arch.inputs), VOCAB, batch=3, seq=11, seed=5, pad=pad)
    if arch.right_pad:
        inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    return inputs


def assert_same(ours, theirs, arch, inputs) -> None:
    """Equal logits; with right padding, token-level logits are compared at the real positions (PEFT feeds
    `inputs_embeds`, so RoBERTa numbers pad positions differently there; pads are masked everywhere)."""
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    if arch.right_pad and a.dim() == 3:
        mask = inputs["attention_mask"]
        keep = F.pad(mask, (a.shape[1] - mask.shape[1], 0), value=1).bool()
        a, b = a[keep], b[keep]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def dims(gm) -> dict[str, int]:
    """PEFT reads the prompt width from config names it knows (`hidden_size`, ...): DistilBERT's `dim` it does
    not, and ALBERT's word embeddings are narrower than its hidden size. Give it the word-embedding width."""
    return dict(token_dim=int(gm.get_parameter(word_embedding(gm, "PEFT needs its width").args[0].target).shape[1]),
                num_attention_heads=4, num_layers=2)


def peft_count(peft_model) -> int:
    return peft_model.get_nb_trainable_parameters()[0]


def both_directions(arch, task, model, gm, peft_model, reload, tmp_path) -> None:
    """What we save, PEFT loads with our outputs; what PEFT saves, we load with PEFT's outputs."""
    inputs = fresh(arch)
    randomize_trainable(gm, 1)
    rewrite.save_adapter(gm, tmp_path / "ours")
    assert_same(gm, PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval(), arch, inputs)
    randomize_trainable(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "peft")
    rewrite.load_adapter(reload, tmp_path / "peft")
    assert_same(reload, peft_model.eval(), arch, inputs)


def check_lora(arch, task, base, tmp_path, name="lora", **flags):
    """PEFT's targets and counts, then both adapter directions; returns the graph that loaded PEFT's adapter
    and PEFT's model (`flags`: the LoraConfig fields of a LoRA variant)."""
    model, gm = base(arch, task)
    rewrite.apply(gm, name, rank=4, alpha=8)
    ours = gm.info.history[-1]["report"]["targets"]
    known = gm.info.config.model_type in PEFT_LORA_TARGETS  # else PEFT has no default: name ours
    targets = None if known else sorted({path.rpartition(".")[2] for path in ours})
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type=LORA_TASK[task], r=4, lora_alpha=8,
                                                                 target_modules=targets, **flags))
    adapted = {path.removeprefix("base_model.model.") for path, module in peft_model.named_modules()
               if hasattr(module, "lora_A") and path.startswith("base_model.model.")}
    assert sorted(adapted) == sorted(ours)
    assert count_parameters(gm)[0] == peft_count(peft_model)
    reload = base(arch, task)[1]
    both_directions(arch, task, model, gm, peft_model, reload, tmp_path)
    return reload, peft_model


def check_lora_embedding(arch, task, base, tmp_path):
    """LoRA on the word embedding and on an LM head (a head onto the vocabulary, tied to the embedding on most
    archs): PEFT's counts, both adapter directions, and the fold equal to PEFT's unmerged forward (its
    merge_and_unload writes into the tied weight, which changes the other module too)."""
    model, gm = base(arch, task)
    heads = [p.path for p in GraphQuery(gm).output_heads if p.out_features == VOCAB]
    targets = [module_path(word_embedding(gm, "LoRA targets it")), *heads]
    rewrite.apply(gm, "lora", targets=targets, rank=4, alpha=8)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type=LORA_TASK[task], r=4, lora_alpha=8,
                                                                 target_modules=targets))
    assert count_parameters(gm)[0] == peft_count(peft_model)
    reload = base(arch, task)[1]
    both_directions(arch, task, model, gm, peft_model, reload, tmp_path)
    rewrite.apply(reload, "fold")
    assert_same(reload, peft_model, arch, fresh(arch))


def check_dora(arch, task, base, tmp_path):
    """LoRA's checks with PEFT's `use_dora`; then PEFT's adapter, loaded, folds to PEFT's `merge_and_unload`."""
    reload, peft_model = check_lora(arch, task, base, tmp_path, "dora", use_dora=True)
    rewrite.apply(reload, "fold")
    assert_same(reload, peft_model.merge_and_unload(), arch, fresh(arch))


def check_pissa(arch, task, base, tmp_path):
    """LoRA's checks with PEFT's PiSSA init: we save PEFT's converted adapter, which loads on the original base;
    PEFT's own (unconverted) one we apply as PEFT does, the init run again; then it folds to `merge_and_unload`."""
    reload, peft_model = check_lora(arch, task, base, tmp_path, "pissa", init_lora_weights="pissa")
    rewrite.apply(reload, "fold")
    assert_same(reload, peft_model.merge_and_unload(), arch, fresh(arch))


def check_ia3(arch, task, base, tmp_path):
    """PEFT's counts for our targets (the structural default: k, v, down), both adapter directions, and fold
    equal to PEFT's `merge_and_unload` of our adapter (`merge_adapter`, the same merge left wrapped, where PEFT's
    IA3 cannot unload: a saved head module without a weight of its own, RoBERTa's `classifier`)."""
    model, gm = base(arch, task)
    rewrite.apply(gm, "ia3")
    report = gm.info.history[-1]["report"]
    config = IA3Config(task_type=LORA_TASK[task], target_modules=report["targets"],
                       feedforward_modules=report["feedforward"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    assert count_parameters(gm)[0] == peft_count(peft_model)
    both_directions(arch, task, model, gm, peft_model, base(arch, task)[1], tmp_path)
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    if all(hasattr(model.get_submodule(m), "weight") for m in gm.info.modules_to_save or []):
        merged = merged.merge_and_unload()
    else:
        merged.merge_adapter()
    rewrite.apply(gm, "fold")
    assert_same(gm, merged, arch, fresh(arch))


def dequantized_base(base):
    """`base` with the graph's projections quantized (int4, block 16) and the eager model holding the dequantized
    weights the graph computes with (Conv1D's `[in, out]` transposed back): PEFT over that model is the reference
    for LoRA over a quantized base."""
    def get(arch, task):
        model, gm = base(arch, task)
        rewrite.apply(gm, "quantize", bits=4, block_size=16)
        model = copy.deepcopy(model)
        with torch.no_grad():
            for node in filter(quantized.is_quantized, gm.graph.nodes):
                read = next(arg for arg in node.args if getattr(arg, "op", None) == "get_attr")
                module = model.get_submodule(read.target.rpartition(".")[0])
                weight = quantized.dequantized_weight(gm, node)
                module.weight.copy_(weight.T if isinstance(module, Conv1D) else weight)
        return model, gm
    return get


def check_lora_quantized(arch, task, base, tmp_path):
    """LoRA over an int4 base: PEFT's targets, counts and outputs (both adapter directions) over the same
    dequantized weights."""
    check_lora(arch, task, dequantized_base(base), tmp_path)


def check_prompt(arch, task, base, tmp_path):
    model, gm = base(arch, task)
    rewrite.apply(gm, "prompt", num_virtual_tokens=COUNT)
    peft_model = get_peft_model(copy.deepcopy(model),
                                PromptTuningConfig(task_type=PROMPT_TASK[task], num_virtual_tokens=COUNT, **dims(gm)))
    assert count_parameters(gm)[0] == peft_count(peft_model)
    both_directions(arch, task, model, gm, peft_model, base(arch, task)[1], tmp_path)


def check_p_tuning_adapter(arch, task, base, tmp_path):
    model, gm = base(arch, task)
    config = PromptEncoderConfig(task_type=PROMPT_TASK[task], num_virtual_tokens=COUNT, encoder_hidden_size=16,
                                 encoder_reparameterization_type="MLP", **dims(gm))
    peft_model = get_peft_model(copy.deepcopy(model), config)
    randomize_trainable(peft_model, 3)
    peft_model.save_pretrained(tmp_path / "peft")
    rewrite.load_adapter(gm, tmp_path / "peft")
    assert_same(gm, peft_model.eval(), arch, fresh(arch))
    # back to PEFT: the trained encoder's output table, PEFT's own inference-time form of a P-tuning adapter
    rewrite.save_adapter(gm, tmp_path / "ours")
    assert_same(gm, PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval(), arch, fresh(arch))


def check_ptuning(arch, task, base, tmp_path):
    """Reserved placeholder ids read the prompt table: the model on `inputs_embeds` with those rows swapped."""
    model, gm = base(arch, task)
    rewrite.apply(gm, "ptuning", template="[P] [P] {text} [P]", encoder="none")
    with torch.no_grad():
        gm.get_parameter(TABLE).normal_(generator=torch.Generator().manual_seed(4))
    inputs = fresh(arch, pad=False)
    ids = inputs["input_ids"]
    ids[:, :2] = torch.tensor([VOCAB, VOCAB + 1])
    ids[:, 6] = VOCAB + 2
    placeholder = ids >= VOCAB
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids.clamp(max=VOCAB - 1))
        embeds[placeholder] = gm.get_parameter(TABLE)[ids[placeholder] - VOCAB]
        expected = model(inputs_embeds=embeds, **{k: v for k, v in inputs.items() if k != "input_ids"}).logits
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=0, atol=1e-5)


def word_tokenizer(arch):
    """A word-level tokenizer over the tiny vocabulary: BERT-style words, or RoBERTa's byte-level `Ġword`
    tokens (and the bare words as other ids), so a label word is read as it appears after a space."""
    bpe = arch.name in BPE
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if bpe else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = special + ([f"Ġ{w}" for w in WORDS] if bpe else []) + WORDS
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=special[3 if bpe else 1]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if bpe else pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=special[3 if bpe else 1],
                                                mask_token=special[4], pad_token=special[1 if bpe else 0])


def check_verbalizer(arch, task, base, tmp_path):
    model, gm = base(arch, task)
    tokenizer = word_tokenizer(arch)
    gm.info.tokenizer = tokenizer
    rewrite.apply(gm, "verbalizer", labels=LABELS)
    inputs = fresh(arch, pad=False)
    positions = torch.tensor([3, 0, 10])
    inputs["input_ids"][torch.arange(3), positions] = tokenizer.mask_token_id
    prefix = "Ġ" if arch.name in BPE else ""
    word_ids = [tokenizer.convert_tokens_to_ids([prefix + w for w in words]) for words in LABELS.values()]
    with torch.no_grad():
        at_mask = model(**inputs).logits[torch.arange(3), positions]
        expected = torch.stack([at_mask[:, ids].mean(-1) for ids in word_ids], dim=1)
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=0, atol=1e-5)


CHECKS = {"lora": check_lora, "lora_embedding": check_lora_embedding, "lora_int4": check_lora_quantized, "dora": check_dora, "ia3": check_ia3, "pissa": check_pissa, "prompt": check_prompt, "p_tuning_adapter": check_p_tuning_adapter,
          "ptuning": check_ptuning, "verbalizer": check_verbalizer}


@pytest.mark.parametrize("arch,task,name", cells(), ids=[cell_id(*cell) for cell in cells()])
def test_cell(base, tmp_path, arch, task, name):
    if name in arch.unsupported:
        with pytest.raises(RewriteError, match=f"on {arch.config.model_type} {arch.unsupported[name]}"):
            CHECKS[name](arch, task, base, tmp_path)
    else:
        CHECKS[name](arch, task, base, tmp_path)


def test_roberta_heads_train_and_save_whole_with_peft_counts(tmp_path):
    """RoBERTa's head is `classifier.dense` + `classifier.out_proj`: PEFT trains and saves both as `classifier`."""
    arch = next(a for a in ARCHS if a.name == "RoBERTa")
    config = copy.deepcopy(arch.config)
    config.update(dict(hidden_size=64, intermediate_size=128, num_labels=3))
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(config).eval()
    for name, options, expected in [("prompt", dict(num_virtual_tokens=8), 4_867),
                                    ("lora", dict(rank=4, alpha=8, targets=["query", "value"]), 6_403)]:
        gm = rewrite.capture(copy.deepcopy(model), example_inputs(["input_ids", "attention_mask"], VOCAB))
        rewrite.apply(gm, name, **options)
        assert count_parameters(gm)[0] == expected
        assert gm.info.modules_to_save == ["classifier"]


def test_the_readme_support_table_is_the_matrix_with_every_cell_passing():
    """`python tests/support_table.py` writes it; a cell changed in `matrix.py` without regenerating fails here."""
    from support_table import README, readme_table

    assert readme_table(README.read_text()) == render({cell_id(*cell): True for cell in cells()})
