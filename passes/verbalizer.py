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

The gather then moves up as far as the arithmetic allows (`rewrite.rows`): every node before the
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
import glob
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
import yaml
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree
from transformers.utils import ModelOutput

from rewrite.errors import RewriteError
from rewrite.graph import GraphQuery, Projection, architecture, module_path, word_embedding
from rewrite.ir import add_submodule, info, tensor_at
from rewrite.params import canonical_names, mark_trainable
from rewrite.pipeline import Pass, option, register
from rewrite.rows import Builder, is_tokenwise, rows_at

log = logging.getLogger(__name__)
aten = torch.ops.aten

AGGREGATIONS = ("mean", "log-softmax")
MLM_HEADS = ("auto", "pretrained", "tied")
OPENPROMPT_EPSILON = 1e-15
# A LayerNorm-ed encoder's hidden states are O(1) (MiniLM's lie within +-6): shifted by 10, GELU is
# the identity to within 3e-7 relative, and the LayerNorm after it removes the shift exactly.
TIED_SHIFT = 10.0
BUFFERS = "verbalizer"

@dataclass
class VerbalizerOutput(ModelOutput):
    """Class scores `[batch, num_labels]`; `mlm_logits` `[batch, seq, vocab]` only when kept for PET's
    auxiliary loss."""

    logits: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None


# --- label words: reading, located errors, token ids ------------------------------------------------


class Located(dict):
    """A mapping read from YAML/JSON that remembers the line of each value, for errors that point at it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.line: int | None = None
        self.lines: dict[Any, int] = {}


class _LineLoader(yaml.SafeLoader):
    pass


def _located_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    mapping = Located()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = value_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _located_mapping)


def read_located(path: str | Path) -> Any:
    """YAML or JSON whose mappings are `Located` (JSON is read as YAML so its lines are known too)."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RewriteError(f"{str(path)!r} could not be read as YAML or JSON: {error}") from error


def where(path: str | Path | None, mapping: Any = None, key: Any = None) -> str:
    """`file line N: ` for an error message (the line of `mapping[key]`, or of `mapping`), or ``."""
    if path is None:
        return ""
    line = None
    if isinstance(mapping, Located):
        line = mapping.lines.get(key, mapping.line) if key is not None else mapping.line
    return f"{path} line {line}: " if line else f"{path}: "


def parse_label_words(data: Any, origin: str | Path | None = None) -> dict[str, list[str]]:
    """`{label: word or [words]}` -> `{label: [words]}` in the given order; labels become strings. A
    document whose `labels` key holds that mapping (a PVP file, `rewrite pet`'s) is read for it."""
    if isinstance(data, Mapping) and isinstance(data.get("labels"), Mapping):
        data = data["labels"]
    if not isinstance(data, Mapping) or not data:
        raise RewriteError(
            f"{where(origin, data)}label words must be a non-empty mapping label -> word or list of words, "
            f"e.g. {{negative: [bad], positive: [good, great]}}"
        )
    words: dict[str, list[str]] = {}
    for label, value in data.items():
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list) or not entries or not all(isinstance(w, str) and w.strip() for w in entries):
            raise RewriteError(f"{where(origin, data, label)}label {label!r} needs a word or a non-empty list of words")
        words[str(label)] = [w.strip() for w in entries]
    if len(words) < 2:
        raise RewriteError(f"{where(origin, data)}a verbalizer needs at least two labels, got {', '.join(words)}")
    return words


def read_label_words(spec: str | Path | Mapping) -> tuple[dict[str, list[str]], str | None]:
    """The `labels` option: a mapping, inline YAML/JSON text `{...}`, or a YAML/JSON file holding one.
    Returns (words, file name or None)."""
    if isinstance(spec, Mapping):
        return parse_label_words(spec), None
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            return parse_label_words(yaml.safe_load(spec)), None
        except yaml.YAMLError as error:
            raise RewriteError(f"labels {spec!r} is not a valid YAML/JSON mapping: {error}") from error
    path = Path(spec)
    if not path.is_file():
        raise RewriteError(f"labels file {str(path)!r} does not exist; give a YAML/JSON mapping label -> words")
    return parse_label_words(read_located(path), path), str(path)


def word_id(tokenizer, word: str, label: str, origin: str = "") -> int:
    """The single token id of a label word, read as it appears after a space (OpenPrompt's default prefix)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = " + ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids)) or "nothing"
        raise RewriteError(
            f"{origin}label word {word!r} (label {label!r}) is not a single token: the tokenizer splits it into "
            f"{pieces}; choose a word that is one token"
        )
    if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
        raise RewriteError(f"{origin}label word {word!r} (label {label!r}) is not in the tokenizer's vocabulary")
    return ids[0]


def label_word_ids(tokenizer, words: dict[str, list[str]], origin: str = "") -> dict[str, list[int]]:
    """`{label: [token id]}` for `{label: [word]}`; any word that is not one known token is an error."""
    return {label: [word_id(tokenizer, w, label, origin) for w in ws] for label, ws in words.items()}


def averaging_matrix(words: dict[str, list[Any]]) -> torch.Tensor:
    """`[labels, all words]`: row l holds `1/n_l` at label l's words, so `scores = word_logits @ M.T`."""
    sizes = [len(ws) for ws in words.values()]
    matrix = torch.zeros(len(sizes), sum(sizes))
    start = 0
    for row, size in enumerate(sizes):
        matrix[row, start:start + size] = 1.0 / size
        start += size
    return matrix


# --- finding the MLM head ----------------------------------------------------------------------------


@dataclass
class MlmHead:
    """The graph's MLM head: `entry` (hidden states) -> token-wise `transform` nodes -> `decoder`."""

    embedding: fx.Node
    decoder: Projection
    transform: list[fx.Node]
    entry: fx.Node

    @property
    def ids(self) -> fx.Node:
        """The token ids the word embedding reads: the user's (prompt tuning slices its virtual ids off before the lookup)."""
        return self.embedding.args[1]

    @property
    def embedding_weight(self) -> fx.Node:
        return self.embedding.args[0]


_ELEMENTWISE = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.tanh.default,
    aten.erf.default, aten.mul.Scalar, aten.add.Scalar,
}


def find_mlm_head(gm: fx.GraphModule) -> MlmHead:
    """Reads the head off the graph: the projection onto the vocabulary that feeds the output, and the
    token-wise nodes before it that lie outside the base model (the module owning the word embedding)."""
    embedding = word_embedding(gm)
    vocab = tensor_at(gm, embedding.args[0].target).shape[0]
    heads = [p for p in GraphQuery(gm).output_heads if p.out_features == vocab]
    if len(heads) != 1:
        raise RewriteError(
            f"found {len(heads)} projections onto the {vocab}-word vocabulary at the graph's output; the verbalizer "
            "needs a masked-LM graph with one MLM decoder (capture with --task masked-lm)"
        )
    decoder = heads[0]
    transform, entry = _head_region(gm, decoder, (module_path(embedding) or "").partition(".")[0])
    return MlmHead(embedding, decoder, transform, entry)


def _head_region(gm: fx.GraphModule, decoder: Projection, base: str) -> tuple[list[fx.Node], fx.Node]:
    """The head's nodes between the base model and the decoder, in graph order, and the one base-model node
    they read. Each acts on every position alone: a linear, norm or activation layer, or the element-wise
    arithmetic a multi-op activation is made of (ALBERT's gelu_new)."""
    region: set[fx.Node] = set()
    entries: set[fx.Node] = set()
    stack = [decoder.input]
    while stack:
        node = stack.pop()
        if node in region or node in entries:
            continue
        if node.op != "call_function" or _in_module(node, base):
            entries.add(node)
            continue
        if not (is_tokenwise(node) or node.target in _ELEMENTWISE):
            raise RewriteError(
                f"the verbalizer on {architecture(gm)} is not supported: its MLM head has a layer other than linear, "
                f"norm, activation and element-wise arithmetic (node {node.name}, {node.target}), and the mask row is "
                "gathered only before such layers"
            )
        region.add(node)
        stack.extend(a for a in node.all_input_nodes if a.op != "get_attr")
    if len(entries) != 1:
        raise RewriteError(f"the verbalizer on {architecture(gm)} is not supported: its MLM head reads {len(entries)} "
                           "tensors of the base model, and the mask row is gathered from one")
    for node in region:
        if any(user not in region and user is not decoder.node for user in node.users):
            raise RewriteError(f"the MLM head's node {node.name} is also used outside the head; it cannot be pruned")
    return [node for node in gm.graph.nodes if node in region], entries.pop()


def _in_module(node: fx.Node, base: str) -> bool:
    path = module_path(node) or ""
    return path == base or path.startswith(base + ".")


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


def _checkpoint_keys(source: str | None) -> set[str] | None:
    """Tensor names saved in a model directory's safetensors files (None when they cannot be listed)."""
    if not source or not Path(source).is_dir():
        return None
    files = sorted(glob.glob(str(Path(source) / "*.safetensors")))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safetensors.safe_open(file, framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _missing_head_weights(gm: fx.GraphModule, head: MlmHead) -> list[str] | None:
    """Head parameters the source checkpoint does not hold under any of their names (tied tensors have several)."""
    keys = _checkpoint_keys(info(gm).get("source"))
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
                tensor_at(gm, weight.target).copy_(torch.eye(*tensor_at(gm, weight.target).shape))
                if bias and bias[0] is not None:
                    tensor_at(gm, bias[0].target).fill_(shift)
            elif node.target is aten.layer_norm.default:
                _, *affine = _attr_args(node)
                for attr, value in zip(affine, (1.0, 0.0)):
                    if attr is not None:
                        tensor_at(gm, attr.target).fill_(value)
        _, *decoder_bias = _attr_args(head.decoder.node)
        if decoder_bias and decoder_bias[0] is not None:
            tensor_at(gm, decoder_bias[0].target).zero_()
    head.decoder.node.update_arg(1, head.embedding_weight)
    return canonical_names(gm, _head_parameters(head))


# --- the rewrite ----------------------------------------------------------------------------------


def _mask_index(build: Builder, head: MlmHead, mask_id: int, length: fx.Node) -> fx.Node:
    """[batch]: the first position where `ids[b] == mask_id`, in hidden states of sequence length `length`.

    Prompt tuning prepends virtual tokens to the hidden states but the word lookup reads the user's
    ids, so positions are shifted by the length difference (zero when both are the extended ids).
    """
    is_mask = build(aten.eq.Scalar, head.ids, mask_id)
    as_int = build(aten._to_copy.default, is_mask, dtype=torch.int32)
    prepended = build(operator.sub, length, build(aten.sym_size.int, head.ids, 1))
    return build(aten.add.Tensor, build(aten.argmax.default, as_int, 1), prepended)


def _rows_at_mask(build: Builder, gm: fx.GraphModule, head: MlmHead, mask_id: int,
                  move: bool) -> tuple[fx.Node, list[fx.Node]]:
    """The hidden state at each row's mask, [batch, hidden], and the full-length nodes it replaces
    (`rewrite.rows`: with `move`, the nodes before the head that only the mask row needs run on it alone)."""
    def index_for(hidden: fx.Node, axis: int) -> fx.Node:
        return _mask_index(build, head, mask_id, build(aten.sym_size.int, hidden, axis))

    rows, moved = rows_at(build, gm, head.entry, index_for, move=move)
    return build(aten.squeeze.dims, rows, [1]), moved


def _label_scores(build: Builder, word_logits: fx.Node, aggregation: str) -> fx.Node:
    """[batch, words] -> [batch, labels] by the `averaging_matrix` buffer (PET or OpenPrompt semantics)."""
    if aggregation == "log-softmax":
        probs = build(aten._softmax.default, word_logits, -1, False)
        word_logits = build(aten.log.default, build(aten.add.Tensor, probs, OPENPROMPT_EPSILON))
    return build(aten.linear.default, word_logits, build.attr(f"{BUFFERS}.average"))


def _pruned_head(build: Builder, head: MlmHead, gathered: fx.Node) -> fx.Node:
    """A copy of the transform on the gathered [batch, hidden] rows, and the decoder on the label rows only."""
    remap = {head.entry: gathered}
    for node in head.transform:
        remap[node] = build.copy(node, remap)
    word_ids = build.attr(f"{BUFFERS}.word_ids")
    args = head.decoder.node.args
    weight = build(aten.index_select.default, args[1], 0, word_ids)
    bias = build(aten.index_select.default, args[2], 0, word_ids) if len(args) > 2 and args[2] is not None else None
    return build(aten.linear.default, remap.get(args[0], args[0]), weight, bias)


def _set_output(gm: fx.GraphModule, logits: fx.Node, mlm_logits: fx.Node | None) -> None:
    """The graph returns `VerbalizerOutput(logits[, mlm_logits])` (ONNX names the outputs after its keys)."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    leaves = (logits,) if mlm_logits is None else (logits, mlm_logits)
    output.args = (leaves,)
    example = VerbalizerOutput(**dict(zip(("logits", "mlm_logits"), [torch.empty(0)] * len(leaves))))
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=pytree.tree_flatten(example)[1])


def _erase_full_length(gm: fx.GraphModule, head: MlmHead, replaced: list[fx.Node]) -> None:
    """The full head and the full-length nodes whose rows the graph now computes at the mask alone."""
    for node in [head.decoder.node, *reversed(head.transform), *reversed(replaced)]:
        gm.graph.erase_node(node)


def drop_mlm_logits(gm: fx.GraphModule) -> None:
    """After PET's auxiliary-MLM training, the deployed graph outputs class scores only: the full head is
    dropped (dead-code elimination), so inference pays for the label rows alone."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    leaves = output.args[0]
    if len(leaves) == 1:
        return
    _set_output(gm, leaves[0], None)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _relabel_config(gm: fx.GraphModule, labels: list[str]) -> None:
    """Label names travel in the config (ONNX metadata, `rewrite run`); the graph is now a classifier."""
    config = info(gm).get("config")
    if config is not None:
        config = copy.deepcopy(config)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        info(gm)["config"] = config
    info(gm)["task"] = "seq-cls"


@register
@dataclass
class VerbalizerPass(Pass):
    name = "verbalizer"

    labels: str | Mapping[str, str | list[str]] | None = option(
        None, "label words: a YAML/JSON file (or mapping) label -> word or [words], each word one token")
    aggregation: str = option("mean", "label score: mean (PET: mean of raw logits) or log-softmax (OpenPrompt)")
    mask_token: str | None = option(None, "the mask token patterns use (default: the tokenizer's)")
    mlm_head: str = option(
        "auto", "auto (tied when the checkpoint lacks MLM-head weights), pretrained, or tied (built from embeddings)")
    mlm_logits: bool = option(False, "also output full-vocabulary MLM logits (for PET's auxiliary MLM loss)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is None:
            raise RewriteError("the verbalizer needs labels: a mapping label -> words, or a YAML/JSON file holding one")
        if self.aggregation not in AGGREGATIONS:
            raise RewriteError(f"aggregation {self.aggregation!r} is not known; use one of {', '.join(AGGREGATIONS)}")
        if self.mlm_head not in MLM_HEADS:
            raise RewriteError(f"mlm_head {self.mlm_head!r} is not known; use one of {', '.join(MLM_HEADS)}")

    def _tokenizer(self, gm: fx.GraphModule):
        tokenizer = info(gm).get("tokenizer")
        if tokenizer is None:
            raise RewriteError("the graph has no tokenizer to map label words to token ids; capture it from a model "
                               "directory that holds tokenizer files")
        return tokenizer

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
        if info(gm).get("task") not in (None, "masked-lm"):
            raise RewriteError(
                f"the verbalizer needs a masked-LM graph, but this graph's task is {info(gm)['task']!r}; "
                "capture the model with --task masked-lm"
            )
        tokenizer = self._tokenizer(gm)
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
        buffers.register_buffer("average", averaging_matrix(ids).to(tensor_at(gm, head.embedding_weight.target).dtype))
        add_submodule(gm, BUFFERS, buffers)

        first = head.transform[0] if head.transform else head.decoder.node
        build = Builder(gm, first, **{"pass": "verbalizer"})
        gathered, replaced = _rows_at_mask(build, gm, head, mask_id, move=not self.mlm_logits)
        build.anchor = head.decoder.node
        word_logits = _pruned_head(build, head, gathered)
        scores = _label_scores(build, word_logits, self.aggregation)
        _set_output(gm, scores, head.decoder.node if self.mlm_logits else None)
        if not self.mlm_logits:
            _erase_full_length(gm, head, replaced)
        if trained:
            mark_trainable(gm, trained)
        _relabel_config(gm, list(words))
        info(gm)["verbalizer"] = {"labels": list(words), "words": words, "word_ids": ids, "mask_token_id": mask_id,
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
