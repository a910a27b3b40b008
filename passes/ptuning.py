"""P-tuning: continuous prompt vectors at a template's placeholder positions; the sequence length stays.

Placeholders are token ids in the input: tokens the user names (BERT's `[unused1]`..., the seed's
variant) or reserved ids the pass adds after the vocabulary. `rewrite.text.templates` turns
`"[P] [P] [P] {text} [P] [MASK] ."` into such ids. The word-embedding lookup is routed: at a
placeholder the model reads row `slot` of the prompt table, elsewhere its own embedding.

The table is the output of a prompt encoder (P-tuning paper, Liu et al. 2021): `lstm` is the paper's
bi-LSTM (2 layers, hidden H/2 per direction) followed by its MLP (H -> H -> H); `mlp` is that MLP
alone; `none` trains the table directly (the seed's variant, which trains only the placeholder rows).
The encoder is captured once and inlined as graph nodes over its parameters, so the rewritten graph
saves, loads and trains like any other. The encoder takes no data, so its output is a constant: fold
evaluates it once and keeps only that table and one gather (its ONNX model has no LSTM).

The template travels with the graph (`info.template`), so training encodes text through it, and
with the exported model (its metadata), so `rewrite run` does too. PEFT's P_TUNING prepends its
prompts, which cannot express prompts at template positions: such graphs have no PEFT adapter file.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rewrite.adapters.slots import Slot, tensor_slot
from rewrite.graph.capture import capture
from rewrite.runtime.schema import TEMPLATE, encoding_metadata
from rewrite.errors import RewriteError
from rewrite.graph.query import GraphQuery, embedding_output, lookup_table, word_embedding
from rewrite.graph.ir import InputTemplate, add_submodule, copy_meta, info, remove_submodule, require_tokenizer, tag
from rewrite.graph.nodes import NodeBuilder
from rewrite.graph.params import forget_trainable, mark_trainable, non_finite, trainable_heads
from rewrite.graph.pipeline import AdapterFiles, Folded, Pass, option, register
from rewrite.adapters.prompt_table import ENCODER, TABLE, TOKENS, check_no_prompt, initial_table, register_tokens, sampled_rows
from rewrite.text.templates import Template

aten = torch.ops.aten


class PromptEncoder(nn.Module):
    """Maps `count` trainable input embeddings to the prompt table (PEFT's attribute names).

    `lstm`: `mlp_head(lstm_head(embedding))`, the paper's bi-LSTM + MLP; `mlp`: `mlp_head(embedding)`;
    `none`: the embedding itself. The input takes no data, so the output is a constant after training.
    """

    def __init__(self, kind: str, initial: torch.Tensor):
        super().__init__()
        self.kind = kind
        count, hidden = initial.shape
        self.embedding = nn.Embedding.from_pretrained(initial, freeze=False)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
        if kind in ("lstm", "mlp"):
            self.mlp_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.to(initial.device)

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        if self.kind == "lstm":
            layers, hidden = self.lstm_head.num_layers * 2, self.lstm_head.hidden_size
            state = table.new_zeros(layers, 1, hidden)
            table = self.lstm_head(table.unsqueeze(0), (state, state))[0].squeeze(0)
        if self.kind in ("lstm", "mlp"):
            table = self.mlp_head(table)
        return table


def _inline(gm: fx.GraphModule, emit: NodeBuilder, encoder: PromptEncoder) -> fx.Node:
    """Captures `encoder()` and copies its nodes into `gm` over the parameters registered at `prompt_encoder`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")  # nn.LSTM's _flat_weights
        captured = capture(encoder, {}, dynamic=False)
    captured.graph.eliminate_dead_code()  # the LSTM's unused final states: fold erases exactly the table's ancestors
    env: dict[fx.Node, fx.Node] = {}
    for node in captured.graph.nodes:
        if node.op == "get_attr":
            env[node] = emit.attr(f"{ENCODER}.{node.target}")
        elif node.op == "call_function":
            copied = gm.graph.create_node("call_function", node.target, fx.map_arg(node.args, env.get),
                                          fx.map_arg(node.kwargs, env.get))
            env[node] = emit.keep(copied, encoder=True)
    table = env[captured.graph.output_node().args[0][0]]
    table.meta["rewrite"]["prompt_table"] = ENCODER  # what fold replaces by a constant
    return table


@register
@dataclass
class PtuningPass(Pass):
    """P-tuning with a template; only the prompt encoder (and a seq-cls head, as PEFT) trains."""

    name = "ptuning"
    title = "P-tuning"

    template: str | None = option(None, "template with [P] prompt slots and a {text} field, "
                                        "e.g. '[P] [P] [P] {text} [P] [MASK] .'")
    placeholders: list[str] | None = option(
        None, "tokens that stand for the [P] slots, e.g. [unused1],[unused2] (default: reserved ids after the vocabulary)")
    encoder: Literal["lstm", "mlp", "none"] = option(
        "lstm", "prompt encoder: lstm (the paper's bi-LSTM + MLP), mlp, or none (direct embeddings)", label="prompt encoder")
    modules_to_save: list[str] | None = option(
        None, "modules trained and saved in full (default: the head of a seq-cls graph, like PEFT)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.template:
            raise RewriteError("P-tuning needs a template, e.g. '[P] [P] [P] {text} [P] [MASK] .'")
        self.parsed = Template.parse(self.template)

    def _placeholder_ids(self, gm: fx.GraphModule, vocab: int) -> list[int]:
        """The named tokens' ids, or reserved ids after the vocabulary; one per `[P]` in the template."""
        count = self.parsed.prompt_count
        if self.placeholders is None:
            return list(range(vocab, vocab + count))
        if len(self.placeholders) != count or len(set(self.placeholders)) != count:
            raise RewriteError(f"the template has {count} [P] placeholders but {len(self.placeholders)} "
                               f"placeholder tokens were named ({len(set(self.placeholders))} distinct); name {count}")
        tokenizer = require_tokenizer(gm, "to look up named placeholder tokens (leave placeholders unset for reserved ids)")
        ids = tokenizer.convert_tokens_to_ids(self.placeholders)
        unknown = [t for t, i in zip(self.placeholders, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise RewriteError(f"placeholder token {', '.join(unknown)} is not in the tokenizer's vocabulary; "
                               "name single tokens it knows, such as [unused1]")
        special = [t for t, i in zip(self.placeholders, ids) if i in tokenizer.all_special_ids]
        if special:
            raise RewriteError(f"placeholder token {', '.join(special)} is a special token the model and templates use "
                               "themselves; name unused tokens, such as [unused1]")
        return ids

    def _initial_rows(self, weight: torch.Tensor, ids: list[int]) -> torch.Tensor | list[int] | None:
        """The paper's N(0, 1) input embeddings for an encoder; for `none`, the placeholders' own rows
        (sampled vocabulary rows for reserved ids), so the untrained table speaks the model's scale."""
        if self.encoder != "none":
            return None
        return ids if ids[0] < weight.shape[0] else sampled_rows(weight, len(ids))

    def _route(self, gm: fx.GraphModule, embed: fx.Node, encoder: PromptEncoder, reserved: bool) -> None:
        """`embed(ids)` becomes `where(ids is a placeholder, table[slot], embed(ids))`, at the embedding module's output."""
        graph, ids = gm.graph, embed.args[1]
        weight = lookup_table(gm, embed)
        emit = NodeBuilder(graph, embed, **{"pass": self.name})
        if reserved:
            with graph.inserting_before(embed):
                embed.update_arg(1, emit(aten.clamp.default, ids, None, weight.shape[0] - 1))
        words = embedding_output(embed)
        with graph.inserting_before(words.next):
            table = emit.attr(TABLE) if self.encoder == "none" else _inline(gm, emit, encoder)
            match = emit(aten.eq.Tensor, emit(aten.unsqueeze.default, ids, -1), emit.attr(TOKENS))
            chosen = emit(aten.any.dim, match, -1, True)
            slot = emit(aten.argmax.default, emit(aten._to_copy.default, match, dtype=torch.int32), -1)
            prompts = emit.to_dtype(emit(aten.embedding.default, table, slot), encoder.embedding.weight.dtype, weight.dtype)
            routed = emit(aten.where.self, chosen, prompts, words)
        emit.redirect(words, routed)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        check_no_prompt(gm)
        embed = word_embedding(gm, "prompt vectors enter the model there")
        tokenizer = info(gm).tokenizer
        if tokenizer is not None:
            self.parsed.check(tokenizer)
        weight = lookup_table(gm, embed)
        vocab, hidden = weight.shape
        if self.encoder == "lstm" and hidden % 2:
            raise RewriteError(f"the LSTM encoder needs an even hidden size (H/2 per direction); this model's is {hidden}")
        ids = self._placeholder_ids(gm, vocab)
        reserved = ids[0] >= vocab
        encoder = PromptEncoder(self.encoder, initial_table(weight, len(ids), self._initial_rows(weight, ids)))
        heads = trainable_heads(gm, self.modules_to_save)
        add_submodule(gm, ENCODER, encoder)
        register_tokens(gm, ids, weight.device)
        self._route(gm, embed, encoder, reserved)
        mark_trainable(gm, [f"{ENCODER}.{n}" for n, _ in encoder.named_parameters()] + heads)
        info(gm).template = InputTemplate(self.template, tuple(ids))
        self.report = {
            "placeholder_ids": ids,
            "reserved_ids": reserved,
            "encoder": self.encoder,
            "modules_to_save": sorted({n.rpartition(".")[0] for n in heads}),
            "summary": f"{len(ids)} prompt vectors at template placeholders ({self.encoder} encoder, "
                       f"{'reserved' if reserved else 'token'} ids {', '.join(map(str, ids))})",
        }
        return PassResult(gm, True)

    @classmethod
    def adapter_files(cls, gm: fx.GraphModule, runs: Sequence["PtuningPass"]) -> AdapterFiles:
        raise RewriteError("P-tuning puts prompts at template positions, which PEFT's P_TUNING (prepended prompts) "
                           "cannot express; save the graph with rewrite.save instead")

    @classmethod
    def serving_metadata(cls, gm: fx.GraphModule, runs: Sequence["PtuningPass"]) -> dict[str, str]:
        """The template and its placeholder ids as data, so serving feeds the model what training did."""
        last = runs[-1]
        return encoding_metadata(TEMPLATE, template=last.template, placeholder_ids=last.report["placeholder_ids"])

    @classmethod
    def adapter_slots(cls, gm: fx.GraphModule, runs: Sequence["PtuningPass"]) -> list[Slot]:
        """The prompt table the encoder computes (`prepare_slots` has made it a constant)."""
        return [tensor_slot(gm, TABLE)]

    @classmethod
    def prepare_slots(cls, gm: fx.GraphModule, runs: Sequence["PtuningPass"]) -> None:
        """An adapter replaces the encoder's output, so the encoder becomes its table."""
        fold_prompt_encoders(gm)

    @classmethod
    def fold(cls, gm: fx.GraphModule, runs: Sequence["PtuningPass"]) -> Folded | None:
        """The prompt encoder becomes its constant output table (report key `prompt_encoders`)."""
        folded = fold_prompt_encoders(gm)
        return Folded("prompt_encoders", folded, f"{len(folded)} prompt encoder into a constant table") if folded else None


def _evaluate(gm: fx.GraphModule, output: fx.Node, nodes: set[fx.Node]) -> torch.Tensor:
    """Runs the data-free subgraph `nodes` (which computes `output`) once, over `gm`'s parameters."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in nodes:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[output])
    with torch.no_grad():
        return fx.GraphModule(gm, graph)().detach()


def fold_prompt_encoders(gm: fx.GraphModule) -> list[str]:
    """Replaces each prompt encoder by its output table at `<encoder>.embedding.weight`; returns the encoders folded."""
    folded = []
    for table in [n for n in gm.graph.nodes if tag(n).get("prompt_table")]:
        path, made_by = tag(table)["prompt_table"], tag(table)["pass"]
        upstream = nx.ancestors(GraphQuery(gm).digraph, table) | {table}
        encoder_nodes = {n for n in upstream if tag(n).get("pass") == made_by}
        value = _evaluate(gm, table, encoder_nodes)
        if non_finite([(path, value)]):
            raise RewriteError(f"folding the prompt encoder {path} gives non-finite values; the encoder is corrupt")
        names = [f"{path}.{name}" for name, _ in gm.get_submodule(path).named_parameters()]
        remove_submodule(gm, path)
        add_submodule(gm, f"{path}.embedding", nn.Embedding.from_pretrained(value, freeze=True))
        with gm.graph.inserting_before(table):
            constant = gm.graph.get_attr(f"{path}.embedding.weight")
        copy_meta(table, constant, **{"pass": made_by})
        table.replace_all_uses_with(constant)
        for node in reversed(list(gm.graph.nodes)):
            if node in encoder_nodes:
                gm.graph.erase_node(node)
        forget_trainable(gm, names)
        folded.append(path)
    return folded
