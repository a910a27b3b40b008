"""How an exported model's text becomes its inputs, from the encoding its metadata holds as data
(`rewrite.runtime.schema`: `ENCODING_KEY`, written by a pass's `serving_metadata` hook through
`encoding_metadata`):

- `{"kind": "template", "template": "[P] [P] {text} [P] [MASK] .", "placeholder_ids": [2, 3, 4]}`:
  each text through a template with prompt slots (`rewrite.text.templates`), padded as training pads;
- `{"kind": "pattern", "pattern": "{text_a} It was [MASK] ."}`: each text written through a cloze
  pattern (`rewrite.text.labels.PVP`), its text (never the pattern) cut to the model's positions;
- no key: each text tokenized as it is.

Serving (`predict`, `generate`) reads only this data, never the pass classes, so it encodes alike
whether or not the passes are imported.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from rewrite.runtime.schema import PATTERN, TEMPLATE, ModelSchema
from rewrite.text.examples import Example
from rewrite.text.labels import PVP
from rewrite.text.templates import Template, pad_batch

Inputs = dict[str, np.ndarray]


def _tokenized(tokenizer, texts: list[str]) -> Inputs:
    return {k: np.asarray(v, dtype=np.int64) for k, v in tokenizer(texts, padding=True, return_tensors="np").items()}


def _template_inputs(encoding: dict[str, Any], schema: ModelSchema, tokenizer, texts: list[str]) -> Inputs:
    """Each text through the template, padded as training pads."""
    template = Template.parse(encoding["template"])
    rows = [template.encode(tokenizer, encoding["placeholder_ids"], text).ids for text in texts]
    return pad_batch(rows, tokenizer)


def _pattern_inputs(encoding: dict[str, Any], schema: ModelSchema, tokenizer, texts: list[str]) -> Inputs:
    """Each text written through the pattern, its text cut (never the pattern) to the model's positions."""
    pvp = PVP("served", encoding["pattern"], {})
    limit = schema.max_positions or int(tokenizer.model_max_length)
    return _tokenized(tokenizer, [pvp.render(Example(text, None, None, f"text {i + 1}"), tokenizer, limit)
                                  for i, text in enumerate(texts)])


_ENCODERS: dict[str, Callable[..., Inputs]] = {TEMPLATE: _template_inputs, PATTERN: _pattern_inputs}


def encode_texts(schema: ModelSchema, tokenizer, texts: list[str]) -> Inputs:
    """The model's inputs for `texts`, as its metadata's encoding says (plain tokenization without one)."""
    if schema.encoding is None:
        return _tokenized(tokenizer, texts)
    return _ENCODERS[schema.encoding["kind"]](schema.encoding, schema, tokenizer, texts)
