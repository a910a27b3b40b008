"""Prompt tuning: `n` trainable virtual-token embeddings prepended to the input, as PEFT's PROMPT_TUNING.

The graph keeps its user-facing signature. At entry, `n` reserved virtual ids (`>=` the vocabulary
size) are concatenated in front of `input_ids`, ones in front of `attention_mask`, zeros in front of
`token_type_ids` and -100 in front of token-level `labels`, and every use of those placeholders
(including the `sym_size` nodes that carry the dynamic sequence length) reads the extended tensors:
positions, masks and the loss follow from the extended sequence exactly as in PEFT. The word-embedding
lookup still reads the user's ids and the prompt table is concatenated in front of its result, which
is PEFT's `cat(prompts, embed(ids))` (DESIGN.md: prepending this way matched with max diff 0.0).

Adapter files are PEFT's PROMPT_TUNING (`prompt_embeddings` + a seq-cls head); PEFT's PROMPT_TUNING
and P_TUNING adapters load as prepended prompts (PEFT saves a P_TUNING adapter's encoder output,
which it then prepends exactly as prompt tuning does).
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from rewrite.adapters.peft_files import PROMPT_KEY, adapter_base, peft_task_type, saved_modules
from rewrite.adapters.slots import Slot, tensor_slot
from rewrite.training.data import IGNORE_INDEX
from rewrite.errors import RewriteError
from rewrite.graph.query import embedding_output, lookup_table, mark_extended, placeholders, word_embedding
from rewrite.graph.ir import add_submodule, info, require_tokenizer, tensor_at
from rewrite.graph.nodes import NodeBuilder
from rewrite.graph.params import mark_trainable, trainable_heads
from rewrite.graph.pipeline import AdapterFiles, Pass, Pipeline, option, register
from rewrite.adapters.prompt_table import (
    ENCODER, TABLE, TOKENS, check_no_prompt, check_not_seq2seq, initial_table, register_tokens, sampled_rows,
)

aten = torch.ops.aten
log = logging.getLogger(__name__)

PROMPT_PREFIX = "base_model."  # PEFT's prefix for a prompt-learning adapter's other tensors (the head)
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
TOKEN_LEVEL_TASKS = ("causal-lm", "masked-lm", "feature-extraction")
_PREFIX_FILL = {"attention_mask": 1, "token_type_ids": 0}


def _prompt_init(choice: str | None, init_text: str | None) -> str:
    """`text` when an init text is given, else `random`; a contradicting explicit choice is an error."""
    init = choice or ("text" if init_text else "random")
    if (init == "text") != bool(init_text):
        raise RewriteError(
            "prompt_init 'text' needs init_text, and init_text needs prompt_init 'text' (or no prompt_init)"
        )
    return init


def _text_ids(gm: fx.GraphModule, text: str, count: int) -> list[int]:
    """PEFT's TEXT init: the text's token ids (special tokens included), cut to `count` or repeated to fill it."""
    ids = require_tokenizer(gm, "to tokenize init_text")(text)["input_ids"]
    if len(ids) > count:
        log.warning("init text %r has %d tokens, more than the %d virtual tokens: its first %d initialize "
                    "the prompt (as PEFT does)", text, len(ids), count, count)
    return (ids * math.ceil(count / len(ids)))[:count]


def _extension(emit: NodeBuilder, name: str, user_input: fx.Node, count: int, task: str) -> fx.Node | None:
    """`cat(fill, x)` along the sequence, or None for inputs without a sequence axis (seq-cls labels)."""
    if name == "labels" and task not in TOKEN_LEVEL_TASKS:
        return None
    batch = emit(aten.sym_size.int, user_input, 0)
    if name == "input_ids":
        virtual = emit(aten.unsqueeze.default, emit.attr(TOKENS), 0)
        prefix = emit(aten.expand.default, virtual, [batch, count])
    else:
        fill = IGNORE_INDEX if name == "labels" else _PREFIX_FILL[name]
        prefix = emit(aten.new_full.default, user_input, [batch, count], fill)
    extended = emit(aten.cat.default, [prefix, user_input], 1)
    mark_extended(extended, name)  # found by `model_input`
    return extended


def _sequence_outputs(gm: fx.GraphModule) -> list[int]:
    """Indices of the flat outputs with a sequence axis: token-level logits and hidden states."""
    spec = gm.graph._codegen.pytree_info.out_spec
    leaves = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    found = []
    for path, index in pytree.tree_flatten_with_path(leaves)[0]:
        key = str(getattr(path[0], "key", getattr(path[0], "name", ""))) if path else ""
        if key in ("last_hidden_state", "hidden_states") or (key == "logits" and info(gm).task in TOKEN_LEVEL_TASKS):
            found.append(index)
    return found


@register
@dataclass
class PromptPass(Pass):
    """PEFT's PROMPT_TUNING as a rewrite: works for causal LMs, masked LMs and sequence classifiers."""

    name = "prompt"
    title = "prompt tuning"
    peft_types = ("PROMPT_TUNING", "P_TUNING")

    num_virtual_tokens: int = option(20, "virtual tokens prepended to the input (PEFT's num_virtual_tokens)")
    prompt_init: Literal["random", "vocab", "text"] | None = option(
        None, "prompt init: random, vocab (sampled token rows) or text (default: text with --init-text, else random)")
    init_text: str | None = option(None, "text whose token embeddings initialize the prompt (cut or repeated to fit)")
    strip_virtual: bool = option(False, "drop the virtual positions from sequence outputs (logits, hidden states)")
    modules_to_save: list[str] | None = option(
        None, "modules trained and saved in full (default: the head of a seq-cls graph, like PEFT)")

    def __post_init__(self) -> None:
        super().__post_init__()
        count = self.num_virtual_tokens
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise RewriteError(f"num_virtual_tokens {count!r} is not allowed; use a whole number of at least 1")
        self.prompt_init = _prompt_init(self.prompt_init, self.init_text)

    @classmethod
    def cache_prefix(cls, gm: fx.GraphModule, runs) -> torch.Tensor:
        """The trained table: with a KV cache the virtual tokens enter once, as the cache's constant prefix."""
        dtype = lookup_table(gm, word_embedding(gm, "prompt vectors enter the model there")).dtype
        return tensor_at(gm, TABLE).detach().to(dtype)

    def _initial_rows(self, gm: fx.GraphModule, weight: torch.Tensor) -> torch.Tensor | list[int] | None:
        if self.prompt_init == "text":
            return _text_ids(gm, self.init_text, self.num_virtual_tokens)
        return sampled_rows(weight, self.num_virtual_tokens) if self.prompt_init == "vocab" else None

    def _check_inputs(self, gm: fx.GraphModule) -> dict[str, fx.Node]:
        inputs = placeholders(gm)
        check_not_seq2seq(gm)
        unknown = sorted(set(inputs) - {"input_ids", "labels", *_PREFIX_FILL})
        if unknown:
            raise RewriteError(
                f"prompt tuning cannot extend the graph input {', '.join(map(repr, unknown))}; it extends input_ids, "
                "attention_mask, token_type_ids and labels (capture without the others, as PEFT ignores position_ids)"
            )
        limit = info(gm).position_limit
        if limit is not None and self.num_virtual_tokens >= limit:
            raise RewriteError(
                f"{self.num_virtual_tokens} virtual tokens leave no room for input in the model's {limit} positions; "
                f"use at most {limit - 1}"
            )
        return inputs

    def _extend_inputs(self, gm: fx.GraphModule, inputs: dict[str, fx.Node], embed: fx.Node) -> None:
        """Every reader of an input sees the prompt-extended tensor (`_prepend` then drops the virtual ids
        from the word-embedding lookup's)."""
        graph = gm.graph
        emit = NodeBuilder(graph, embed, **{"pass": self.name})
        with graph.inserting_before(list(inputs.values())[-1].next):
            for name, node in inputs.items():
                extended = _extension(emit, name, node, self.num_virtual_tokens, info(gm).task)
                if extended is not None:
                    emit.redirect(node, extended)
            limit = info(gm).position_limit
            if limit is not None:
                self._assert_fits(emit, inputs["input_ids"], limit)

    def _assert_fits(self, emit: NodeBuilder, ids: fx.Node, limit: int) -> None:
        """Past the position limit the model fails with a shape error deep inside; say why instead."""
        total = emit(operator.add, emit(aten.sym_size.int, ids, 1), self.num_virtual_tokens)
        room = limit - self.num_virtual_tokens
        message = (f"input longer than {room} tokens: with {self.num_virtual_tokens} virtual tokens the model's "
                   f"{limit} positions allow at most {room}; truncate the input")
        emit(aten._assert_scalar.default, emit(operator.le, total, limit), message)

    def _prepend(self, gm: fx.GraphModule, embed: fx.Node) -> None:
        """`embed(ids)` becomes `cat(prompt table, embed(ids))`, PEFT's computation: the lookup reads the
        extended ids (through whatever views the model applies) with the virtual ones sliced off."""
        graph = gm.graph
        table = tensor_at(gm, TABLE)
        emit = NodeBuilder(graph, embed, **{"pass": self.name})
        with graph.inserting_before(embed):
            embed.update_arg(1, emit(aten.slice.Tensor, embed.args[1], 1, self.num_virtual_tokens))
        words = embedding_output(embed)
        with graph.inserting_before(words.next):
            batch = emit(aten.sym_size.int, embed.args[1], 0)
            prompts = emit(aten.unsqueeze.default, emit.attr(TABLE), 0)
            prompts = emit(aten.expand.default, prompts, [batch, self.num_virtual_tokens, table.shape[1]])
            prompts = emit.to_dtype(prompts, table.dtype, lookup_table(gm, embed).dtype)
            joined = emit(aten.cat.default, [prompts, words], 1)
        emit.redirect(words, joined)

    def _strip(self, gm: fx.GraphModule) -> list[int]:
        """Outputs with a sequence axis drop the virtual positions, so callers see their own length."""
        output = next(iter(gm.graph.find_nodes(op="output")))
        leaves = list(output.args[0])
        stripped = _sequence_outputs(gm)
        emit = NodeBuilder(gm.graph, output, **{"pass": self.name})
        with gm.graph.inserting_before(output):
            for index in stripped:
                leaves[index] = emit(aten.slice.Tensor, leaves[index], 1, self.num_virtual_tokens)
        output.args = (type(output.args[0])(leaves),)
        return stripped

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        check_no_prompt(gm)
        embed = word_embedding(gm, "prompt vectors enter the model there")
        inputs = self._check_inputs(gm)
        weight = lookup_table(gm, embed)
        vocab, count = weight.shape[0], self.num_virtual_tokens
        table = initial_table(weight, count, self._initial_rows(gm, weight))
        heads = trainable_heads(gm, self.modules_to_save)
        add_submodule(gm, f"{ENCODER}.embedding", nn.Embedding.from_pretrained(table, freeze=False))
        register_tokens(gm, list(range(vocab, vocab + count)), weight.device)
        self._extend_inputs(gm, inputs, embed)
        self._prepend(gm, embed)
        stripped = self._strip(gm) if self.strip_virtual else []
        info(gm).prepended_positions = 0 if self.strip_virtual else count  # training pads LM labels by this
        mark_trainable(gm, [TABLE, *heads])
        self.report = {
            "num_virtual_tokens": count,
            "virtual_ids": [vocab, vocab + count - 1],
            "init": self.prompt_init,
            "modules_to_save": sorted({n.rpartition(".")[0] for n in heads}),
            "stripped_outputs": len(stripped),
            "summary": f"{count} virtual tokens prepended ({self.prompt_init} init"
                       + (", virtual positions stripped from outputs)" if self.strip_virtual else ")"),
        }
        return PassResult(gm, True)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["PromptPass"]) -> AdapterFiles:
        """PEFT's PROMPT_TUNING: `prompt_embeddings` `[n, hidden]` and the trained head under `base_model.`."""
        run = runs[-1]
        graph_info, table = info(gm), tensor_at(gm, TABLE)
        config = {
            "peft_type": "PROMPT_TUNING",
            # PEFT prompts only through a task class; FEATURE_EXTRACTION's prepends for any model (masked LMs)
            "task_type": peft_task_type(gm) or "FEATURE_EXTRACTION",
            "base_model_name_or_path": graph_info.source,
            "num_virtual_tokens": run.report["num_virtual_tokens"],
            "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(graph_info.config, "num_attention_heads", None),
            "num_layers": getattr(graph_info.config, "num_hidden_layers", None),
            "prompt_tuning_init": _PEFT_INIT[run.report["init"]],
            "prompt_tuning_init_text": run.init_text,
            "tokenizer_name_or_path": graph_info.source if run.init_text else None,
            "modules_to_save": graph_info.modules_to_save,
            "inference_mode": True,
        }
        tensors = {PROMPT_KEY: table.detach().contiguous().cpu()}
        tensors.update(adapter_base(gm, PROMPT_PREFIX, skip=(TABLE,)))
        return AdapterFiles(config, tensors)

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence["PromptPass"]) -> list[Slot]:
        """The prompt table, `[virtual tokens, hidden]`."""
        return [tensor_slot(gm, TABLE)]

    @classmethod
    def slot_values(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`prompt_embeddings` fills the table; the head keeps its module path."""
        return {(TABLE if key == PROMPT_KEY else key.removeprefix(PROMPT_PREFIX)): value for key, value in weights.items()}

    @classmethod
    def from_adapter(cls, gm: fx.GraphModule, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     origin: str) -> dict[str, str]:
        """Prompts for the adapter's virtual tokens (and its head as modules_to_save); `prompt_embeddings`
        fills the table."""
        check_not_seq2seq(gm)
        if PROMPT_KEY not in weights:
            raise RewriteError(f"adapter {origin!r} has no {PROMPT_KEY} tensor; it is not a prompt-learning adapter")
        embed = word_embedding(gm, "prompt vectors enter the model there")
        hidden = lookup_table(gm, embed).shape[1]
        if weights[PROMPT_KEY].dim() != 2 or weights[PROMPT_KEY].shape[1] != hidden:
            raise RewriteError(f"adapter {origin!r} holds prompts of shape {tuple(weights[PROMPT_KEY].shape)} but "
                               f"this model's embeddings are {hidden} wide; the adapter was made for another model")
        heads = {key.removeprefix(PROMPT_PREFIX): key for key in weights if key != PROMPT_KEY}
        Pipeline([cls(num_virtual_tokens=config["num_virtual_tokens"],
                      modules_to_save=saved_modules(config, heads))]).run(gm)
        return {TABLE: PROMPT_KEY, **heads}
