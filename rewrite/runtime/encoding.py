"""How an exported model's text becomes its inputs, written as data into its ONNX metadata.

The exporter writes one key, `rewrite.runtime.encoding`: a JSON object that names the encoding and holds its
data (a pass returns it from its `serving_metadata` hook through `encoding_metadata`):

- `{"kind": "template", "template": "[P] [P] {text} [P] [MASK] .", "placeholder_ids": [2, 3, 4]}`:
  each text through a template with prompt slots (`rewrite.text.templates`), padded as training pads;
- `{"kind": "pattern", "pattern": "{text_a} It was [MASK] ."}`: each text written through a cloze
  pattern (`rewrite.text.labels.PVP`), its text (never the pattern) cut to the model's positions;
- no key: each text tokenized as it is.

Serving (`predict`, `generate`) reads only this data, never the pass classes, so it encodes alike
whether or not the passes are imported. An encoding this version cannot apply is refused, never
skipped: a model fed its text without its template scores as if it had none.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from rewrite.text.examples import Example
from rewrite.errors import RewriteError
from rewrite.text.labels import PVP
from rewrite.graph.signature import POSITIONS_KEY
from rewrite.text.templates import Template, pad_batch

ENCODING_KEY = "rewrite.encoding"
TEMPLATE, PATTERN = "template", "pattern"
_LEGACY_TEMPLATE, _LEGACY_IDS, _LEGACY_PATTERN = "rewrite.template", "rewrite.placeholder_ids", "rewrite.pattern"
Inputs = dict[str, np.ndarray]


def encoding_metadata(kind: str, **data: Any) -> dict[str, str]:
    """The metadata entry that tells serving to encode text as `kind` with `data`."""
    return {ENCODING_KEY: json.dumps({"kind": kind, **data})}


def _tokenized(tokenizer, texts: list[str]) -> Inputs:
    return {k: v.astype(np.int64) for k, v in tokenizer(texts, padding=True, return_tensors="np").items()}


def _template_inputs(encoding: dict[str, Any], props: dict[str, str], tokenizer, texts: list[str]) -> Inputs:
    """Each text through the template, padded as training pads."""
    template = Template.parse(encoding["template"])
    rows = [template.encode(tokenizer, encoding["placeholder_ids"], text).ids for text in texts]
    return {k: v.numpy() for k, v in pad_batch(rows, tokenizer).items()}


def _pattern_inputs(encoding: dict[str, Any], props: dict[str, str], tokenizer, texts: list[str]) -> Inputs:
    """Each text written through the pattern, its text cut (never the pattern) to the model's positions."""
    pvp = PVP("served", encoding["pattern"], {})
    limit = int(props.get(POSITIONS_KEY) or tokenizer.model_max_length)
    return _tokenized(tokenizer, [pvp.render(Example(text, None, None, f"text {i + 1}"), tokenizer, limit)
                                  for i, text in enumerate(texts)])


# kind -> (its fields and their JSON types, its encoder)
_KINDS: dict[str, tuple[dict[str, type], Callable[..., Inputs]]] = {
    TEMPLATE: ({"template": str, "placeholder_ids": list}, _template_inputs),
    PATTERN: ({"pattern": str}, _pattern_inputs),
}


def _json(text: str | None) -> Any:
    """`text` read as JSON; None when it is not."""
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _legacy(props: dict[str, str]) -> dict[str, Any] | None:
    """The encoding of a model exported before it was one key (a template wins, as it did)."""
    if _LEGACY_TEMPLATE in props:
        return {"kind": TEMPLATE, "template": props[_LEGACY_TEMPLATE], "placeholder_ids": _json(props.get(_LEGACY_IDS))}
    if _LEGACY_PATTERN in props:
        return {"kind": PATTERN, "pattern": props[_LEGACY_PATTERN]}
    return None


def _check(encoding: dict[str, Any], origin: str) -> None:
    """An encoding of a known kind holds its fields, and they fit together."""
    fields, _ = _KINDS[encoding["kind"]]
    for name, kind in fields.items():
        if not isinstance(encoding.get(name), kind):
            _malformed(encoding, origin, f"its {name!r} is not a JSON {'string' if kind is str else 'list'}")
    if encoding["kind"] != TEMPLATE:
        return
    ids, template = encoding["placeholder_ids"], Template.parse(encoding["template"], prompts=False)
    if not template.prompt_count or not template.fields:
        _malformed(encoding, origin, "its template lacks a [P] slot or a {text} field")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        _malformed(encoding, origin, "its 'placeholder_ids' are not all token ids")
    if len(ids) != template.prompt_count:
        _malformed(encoding, origin, f"its template has {template.prompt_count} [P] slots but {len(ids)} "
                   "placeholder ids")


def _malformed(encoding: dict[str, Any], origin: str, problem: str) -> None:
    raise RewriteError(f"{origin!r} has a malformed {encoding['kind']} encoding in its metadata ({problem}); "
                       "re-export the model with `rewrite export`")


def model_encoding(props: dict[str, str], origin: str) -> dict[str, Any] | None:
    """The encoding the model's metadata names (None: plain tokenization); one this version cannot
    apply is an error, never skipped."""
    encoding = _json(props[ENCODING_KEY]) if ENCODING_KEY in props else _legacy(props)
    if encoding is None and ENCODING_KEY not in props:
        return None
    if not isinstance(encoding, dict) or not isinstance(encoding.get("kind"), str):
        raise RewriteError(f"{origin!r} has a {ENCODING_KEY} in its metadata that is not a JSON object naming its "
                           "kind; re-export the model with `rewrite export`")
    if encoding["kind"] not in _KINDS:
        raise RewriteError(f"{origin!r} needs text encoding {encoding['kind']!r}, which this version of rewrite cannot "
                           f"apply (it knows {', '.join(sorted(_KINDS))}); serve it with the version that exported it "
                           "or re-export it with this one")
    _check(encoding, origin)
    return encoding


def encode_texts(props: dict[str, str], tokenizer, texts: list[str], origin: str) -> Inputs:
    """The model's inputs for `texts`, as its metadata's encoding says (`model_encoding`)."""
    encoding = model_encoding(props, origin)
    if encoding is None:
        return _tokenized(tokenizer, texts)
    return _KINDS[encoding["kind"]][1](encoding, props, tokenizer, texts)
