"""Verbalizer: turn a masked-LM graph into a classifier that reads label words at the `[MASK]`.

PET (Schick & Schuetze, 2021) scores a label by the MLM logits of its words at the mask position.
The reference implementations compute the full-vocabulary logits at every position and then pick
a handful of entries. This pass rewrites the graph instead: it gathers the hidden state at the
mask position *before* the MLM head's transform, and restricts the decoder to the label words'
rows (an `index_select` of the decoder weight and bias), so the head costs `batch x hidden x words`
instead of `batch x sequence x hidden x vocabulary`. The result equals taking the full MLM logits
at the mask and averaging each label's words:

- `aggregation="mean"` (PET): a label's score is the mean of its words' raw logits.
- `aggregation="log-softmax"` (OpenPrompt's ManualVerbalizer): softmax over all label words of all
  labels (a word listed under two labels counts twice, as there), `log(p + 1e-15)`, then the mean
  over each label's words.

The gather then moves up as far as the arithmetic allows (`rewrite.graph.row_gather`): every node before the
head that only the mask row needs (in a transformer, the last block's query projection, attention for
the one query row, output projection, residuals, norms, feed-forward, and their LoRA branches) is
recomputed on the gathered rows and its full-length version is dropped; the last block's keys and
values still read every position. This is exact (the same arithmetic on fewer rows) and makes the
rewritten graph cheaper than the bare encoder. With `mlm_logits=True` the full head needs every
position, so the gather stays at the head.

The mask position is found inside the graph from `input_ids == mask_token_id` (the first mask of
each row: the input encoder, `rewrite.pet`, guarantees exactly one), so dynamic batch and sequence
sizes survive. The graph's output becomes `VerbalizerOutput(logits=[batch, num_labels])`, and the
graph's task becomes `seq-cls`, with the label names in its config.

Checkpoints saved without MLM-head weights (our MiniLM is a bare `BertModel`) get a head built from
the tied input embeddings (`mlm_head="tied"`, chosen automatically when the checkpoint lacks the
head's weights): see `_init_tied_head`.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from transformers.utils import ModelOutput

from rewrite.graph.capture import saved_tensor_names
from rewrite.runtime.schema import PATTERN, encoding_metadata
from rewrite.errors import RewriteError
from rewrite.graph.query import MlmHead, find_mlm_head
from rewrite.graph.ir import add_submodule, info, require_tokenizer, tensor_at
from rewrite.text.labels import Aggregation, averaging_matrix, label_word_ids, read_label_words
from rewrite.graph.nodes import NodeBuilder, set_output
from rewrite.graph.params import canonical_names, mark_trainable
from rewrite.graph.pipeline import Pass, option, register
from rewrite.graph.row_gather import rows_at
from rewrite.training.templates import uses_template
from rewrite.graph.transaction import overwrite

log = logging.getLogger(__name__)
aten = torch.ops.aten

OPENPROMPT_EPSILON = 1e-15
# A LayerNorm-ed encoder's hidden states are O(1) (MiniLM's lie within +-6): shifted by 10, GELU is
# the identity to within 3e-7 relative, and the LayerNorm after it removes the shift exactly.
TIED_SHIFT = 10.0
LABEL_BUFFERS = "verbalizer"  # the submodule holding the label word ids and the averaging matrix

@dataclass
class VerbalizerOutput(ModelOutput):
    """Class scores `[batch, num_labels]`; `mlm_logits` `[batch, seq, vocab]` only when kept for PET's
    auxiliary loss."""

    logits: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None


# --- head weights ---------------------------------------------------------------------------------


def _attr_args(node: fx.Node) -> list[fx.Node | None]:
    """The node's arguments after the activation, as get_attr nodes or None (weight, bias / shape, weight, bias)."""
    return [a if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in node.args[1:]]


def _head_parameters(head: MlmHead) -> list[str]:
    """get_attr targets read by the transform and by the decoder's bias (the decoder weight is the embedding)."""
    targets = [a.target for node in head.transform for a in _attr_args(node) if a is not None]
    _, *decoder_bias = _attr_args(head.decoder.node)
    targets += [a.target for a in decoder_bias if a is not None]
    return list(dict.fromkeys(targets))


def _missing_head_weights(gm: fx.GraphModule, head: MlmHead) -> list[str] | None:
    """Head parameters the source checkpoint does not hold under any of their names (tied tensors have several)."""
    keys = saved_tensor_names(info(gm).source)
    if keys is None:
        return None
    names: dict[int, set[str]] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    return [target for target in _head_parameters(head) if not names.get(id(tensor_at(gm, target)), {target}) & keys]


def _choose_head(gm: fx.GraphModule, head: MlmHead, requested: str) -> tuple[str, list[str]]:
    if requested != "auto":
        return requested, []
    missing = _missing_head_weights(gm, head)
    if missing is None:
        log.info("verbalizer: the source checkpoint cannot be listed; using the graph's MLM head as captured")
        return "pretrained", []
    return ("tied", missing) if missing else ("pretrained", [])


def _init_tied_head(gm: fx.GraphModule, head: MlmHead) -> list[str]:
    """A head that starts as `decoder = word embeddings` applied to (re-normalized) hidden states.

    Each transform linear becomes the identity, shifted by TIED_SHIFT when a LayerNorm follows (so a
    GELU between them stays in its linear range and the norm removes the shift); norms become
    weight 1, bias 0; the decoder bias becomes 0. Returns the parameters to train.
    """
    with torch.no_grad():
        for index, node in enumerate(head.transform):
            if node.target is aten.linear.default:
                weight, *bias = _attr_args(node)
                norm_follows = any(n.target is aten.layer_norm.default for n in head.transform[index + 1:])
                shift = TIED_SHIFT if norm_follows else 0.0
                overwrite(tensor_at(gm, weight.target), torch.eye(*tensor_at(gm, weight.target).shape))
                if bias and bias[0] is not None:
                    overwrite(tensor_at(gm, bias[0].target), shift)
            elif node.target is aten.layer_norm.default:
                _, *affine = _attr_args(node)
                for attr, value in zip(affine, (1.0, 0.0)):
                    if attr is not None:
                        overwrite(tensor_at(gm, attr.target), value)
        _, *decoder_bias = _attr_args(head.decoder.node)
        if decoder_bias and decoder_bias[0] is not None:
            overwrite(tensor_at(gm, decoder_bias[0].target), 0.0)
    head.decoder.node.update_arg(1, head.embedding_weight)
    return canonical_names(gm, _head_parameters(head))


# --- the rewrite ----------------------------------------------------------------------------------


def _mask_index(build: NodeBuilder, head: MlmHead, mask_id: int, length: fx.Node) -> fx.Node:
    """[batch]: the first position where `ids[b] == mask_id`, in hidden states of sequence length `length`.

    Prompt tuning prepends virtual tokens to the hidden states but the word lookup reads the user's
    ids, so positions are shifted by the length difference (zero when both are the extended ids).
    """
    is_mask = build(aten.eq.Scalar, head.ids, mask_id)
    as_int = build(aten._to_copy.default, is_mask, dtype=torch.int32)
    prepended = build(operator.sub, length, build(aten.sym_size.int, head.ids, 1))
    return build(aten.add.Tensor, build(aten.argmax.default, as_int, 1), prepended)


def _rows_at_mask(build: NodeBuilder, gm: fx.GraphModule, head: MlmHead, mask_id: int,
                  move: bool) -> tuple[fx.Node, list[fx.Node]]:
    """The hidden state at each row's mask, [batch, hidden], and the full-length nodes it replaces
    (`rewrite.graph.row_gather`: with `move`, the nodes before the head that only the mask row needs run on it alone)."""
    def index_for(hidden: fx.Node, axis: int) -> fx.Node:
        return _mask_index(build, head, mask_id, build(aten.sym_size.int, hidden, axis))

    rows, moved = rows_at(build, gm, head.entry, index_for, move=move)
    return build(aten.squeeze.dims, rows, [1]), moved


def _label_scores(build: NodeBuilder, word_logits: fx.Node, aggregation: str) -> fx.Node:
    """[batch, words] -> [batch, labels] by the `averaging_matrix` buffer (PET or OpenPrompt semantics)."""
    if aggregation == "log-softmax":
        probs = build(aten._softmax.default, word_logits, -1, False)
        word_logits = build(aten.log.default, build(aten.add.Tensor, probs, OPENPROMPT_EPSILON))
    return build(aten.linear.default, word_logits, build.attr(f"{LABEL_BUFFERS}.average"))


def _pruned_head(build: NodeBuilder, head: MlmHead, gathered: fx.Node) -> fx.Node:
    """A copy of the transform on the gathered [batch, hidden] rows, and the decoder on the label rows only."""
    remap = {head.entry: gathered}
    for node in head.transform:
        remap[node] = build.copy(node, remap)
    word_ids = build.attr(f"{LABEL_BUFFERS}.word_ids")
    args = head.decoder.node.args
    weight = build(aten.index_select.default, args[1], 0, word_ids)
    bias = build(aten.index_select.default, args[2], 0, word_ids) if len(args) > 2 and args[2] is not None else None
    return build(aten.linear.default, remap.get(args[0], args[0]), weight, bias)


def _erase_full_length(gm: fx.GraphModule, head: MlmHead, replaced: list[fx.Node]) -> None:
    """The full head and the full-length nodes whose rows the graph now computes at the mask alone."""
    for node in [head.decoder.node, *reversed(head.transform), *reversed(replaced)]:
        gm.graph.erase_node(node)


def _relabel_config(gm: fx.GraphModule, labels: list[str]) -> None:
    """Label names travel in the config (ONNX metadata, `rewrite run`); the graph is now a classifier."""
    config = info(gm).config
    if config is not None:
        config = copy.deepcopy(config)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        info(gm).config = config
    info(gm).task = "seq-cls"


@register
@dataclass
class VerbalizerPass(Pass):
    name = "verbalizer"

    labels: str | Mapping[str, str | list[str]] | None = option(
        None, "label words: a YAML/JSON file (or mapping) label -> word or [words], each word one token")
    aggregation: Aggregation = option("mean", "label score: mean (PET: mean of raw logits) or log-softmax (OpenPrompt)")
    mask_token: str | None = option(None, "the mask token patterns use (default: the tokenizer's)")
    mlm_head: Literal["auto", "pretrained", "tied"] = option(
        "auto", "auto (tied when the checkpoint lacks MLM-head weights), pretrained, or tied (built from embeddings)")
    mlm_logits: bool = option(False, "also output full-vocabulary MLM logits (for PET's auxiliary MLM loss)")
    pattern: str | None = option(
        None, "the cloze pattern ({text_a}, {text_b}, one [MASK]) inputs are written in: an exported model carries it, "
              "so `rewrite run` writes raw text through it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is None:
            raise RewriteError("the verbalizer needs labels: a mapping label -> words, or a YAML/JSON file holding one")

    def _mask_id(self, tokenizer) -> int:
        token = self.mask_token or tokenizer.mask_token
        if token is None:
            raise RewriteError("the tokenizer has no mask token; pass mask_token")
        mask_id = tokenizer.convert_tokens_to_ids(token)
        if mask_id is None or mask_id == tokenizer.unk_token_id:
            raise RewriteError(f"mask token {token!r} is not in the tokenizer's vocabulary")
        return mask_id

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        if info(gm).task not in (None, "masked-lm"):
            raise RewriteError(
                f"the verbalizer needs a masked-LM graph, but this graph's task is {info(gm).task!r}; "
                "capture the model with --task masked-lm"
            )
        tokenizer = require_tokenizer(gm, "to map label words to token ids")
        words, origin = read_label_words(self.labels)
        ids = label_word_ids(tokenizer, words, f"{origin}: " if origin else "")
        mask_id = self._mask_id(tokenizer)
        head = find_mlm_head(gm)
        mode, missing = _choose_head(gm, head, self.mlm_head)
        trained: list[str] = []
        if mode == "tied":
            trained = _init_tied_head(gm, head)
            log.warning(
                "verbalizer: the checkpoint has no MLM-head weights%s; built the head from the tied input embeddings "
                "(transform = identity, norm = 1/0, bias = 0) and made %d head tensors trainable",
                f" ({', '.join(missing)} missing)" if missing else "", len(trained),
            )
        flat_ids = [i for label_ids in ids.values() for i in label_ids]
        buffers = nn.Module()
        buffers.register_buffer("word_ids", torch.tensor(flat_ids, dtype=torch.long))
        average = torch.from_numpy(averaging_matrix(ids))
        buffers.register_buffer("average", average.to(tensor_at(gm, head.embedding_weight.target).dtype))
        add_submodule(gm, LABEL_BUFFERS, buffers)

        first = head.transform[0] if head.transform else head.decoder.node
        build = NodeBuilder(gm.graph, first, before=first, **{"pass": self.name})
        gathered, replaced = _rows_at_mask(build, gm, head, mask_id, move=not self.mlm_logits)
        build.at(head.decoder.node)
        word_logits = _pruned_head(build, head, gathered)
        scores = _label_scores(build, word_logits, self.aggregation)
        set_output(gm, VerbalizerOutput, logits=scores, **({"mlm_logits": head.decoder.node} if self.mlm_logits else {}))
        if not self.mlm_logits:
            _erase_full_length(gm, head, replaced)
        if trained:
            mark_trainable(gm, trained)
        _relabel_config(gm, list(words))
        info(gm).label_words = {"labels": list(words), "words": words, "word_ids": ids, "mask_token_id": mask_id,
                                  "aggregation": self.aggregation, "mlm_head": mode}
        self.report = {
            "labels": words,
            "word_ids": ids,
            "mask_token_id": mask_id,
            "mlm_head": mode,
            "trainable_head": trained,
            "rows_at_mask": len(replaced),
            "summary": (
                f"verbalizer over {len(words)} labels, {len(flat_ids)} label words ({self.aggregation}); head "
                f"{'built from the tied embeddings' if mode == 'tied' else 'as captured'}, gathered at the mask"
                + (f"; {len(replaced)} nodes before it now run on the mask rows only" if replaced else "")
            ),
        }
        return PassResult(gm, True)

    @classmethod
    def serving_metadata(cls, gm: fx.GraphModule, runs: Sequence["VerbalizerPass"]) -> dict[str, str]:
        """The pattern as data, so serving writes raw text through it; a graph that reads its input through a
        template is served through that, as it trains."""
        pattern = runs[-1].pattern
        return encoding_metadata(PATTERN, pattern=pattern) if pattern and not uses_template(gm) else {}
