"""A graph's input template at training time: whether the graph reads its text through one (a prompt pass
bound it), and text and training examples encoded through it as the graph's tensors. The template
language itself is `rewrite.text.templates`, which serving shares."""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import fx

from rewrite.errors import RewriteError
from rewrite.graph.ir import info, require_tokenizer
from rewrite.text.examples import Example, TokenizedExamples
from rewrite.text.templates import FilledTemplate, Template, example_values, pad_batch

log = logging.getLogger(__name__)


def uses_template(gm: fx.GraphModule) -> bool:
    """Whether the graph reads its input through a template (so text must be encoded by it)."""
    return info(gm).template is not None


def graph_template(gm: fx.GraphModule) -> tuple[Template, list[int]]:
    """The graph's input template and the ids of its prompt slots (`info.template`, set by a prompt pass)."""
    bound = info(gm).template
    if bound is None:
        raise RewriteError("the graph reads no input template; run a pass that adds one (such as P-tuning) first")
    return Template.parse(bound.source), list(bound.placeholder_ids)


def _encode_all(gm: fx.GraphModule, values: Sequence[Mapping[str, str] | str],
                max_length: int | None) -> tuple[list[FilledTemplate], list[int], object]:
    """Every item through the graph's template; texts that hold placeholder ids are counted and logged."""
    template, prompt_ids = graph_template(gm)
    tokenizer = require_tokenizer(gm, "to encode text through its template")
    encoded = [template.encode(tokenizer, prompt_ids, item, max_length) for item in values]
    clashing = sum(e.clashes > 0 for e in encoded)
    if clashing:
        log.warning("%d of %d texts contain the template's placeholder tokens; those positions get prompt vectors, "
                    "not the tokens' embeddings", clashing, len(values))
    return encoded, prompt_ids, tokenizer


def encode_batch(gm: fx.GraphModule, texts: Sequence[Mapping[str, str] | str], *,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` (and `token_type_ids` if the graph takes them) for `texts` put
    through the graph's P-tuning template, padded to the longest as training pads.

    Texts whose own tokens include a placeholder id (a user writing `[unused1]`) are counted and
    logged: the model sees a prompt vector there, not the token.
    """
    encoded, _, tokenizer = _encode_all(gm, texts, max_length)
    inputs = {name: torch.from_numpy(value) for name, value in pad_batch([e.ids for e in encoded], tokenizer).items()}
    names = info(gm).input_names or ["input_ids", "attention_mask"]
    return {name: inputs[name] for name in names if name in inputs}


def encode_examples(gm: fx.GraphModule, examples: Sequence[Example], max_length: int) -> TokenizedExamples:
    """Training data for a P-tuned graph: each example through the template (only its texts are cut to
    fit), with the placeholder ids reserved so they are never language-modeling targets."""
    template, _ = graph_template(gm)
    encoded, prompt_ids, _ = _encode_all(gm, [example_values(template, e) for e in examples], max_length)
    cut = [i for i, e in enumerate(encoded) if e.truncated]
    if cut:
        log.warning("%d of %d examples did not fit %d tokens with the template and were truncated (first: %s)",
                    len(cut), len(examples), max_length, examples[cut[0]].where)
    labels = [e.label for e in examples] if examples[0].label is not None else None
    features = [{"input_ids": e.ids} for e in encoded]
    return TokenizedExamples(features, labels, len(cut), tuple(prompt_ids))
