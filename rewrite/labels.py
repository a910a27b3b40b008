"""Label words: reading them (with file and line for every error), their token ids, and how a
label's score averages its words' scores.

A verbalizer maps each label to one or more words that are single tokens of the model's tokenizer:
`{negative: [bad, terrible], positive: [good, great]}`, inline, or in a YAML/JSON file (a PVP file's
`labels` section is accepted as one). The verbalizer pass and the PET recipe both read them here.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from rewrite.errors import RewriteError

Aggregation = Literal["mean", "log-softmax"]  # PET's mean of raw logits, or OpenPrompt's log-softmax
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__


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


def line_of(path: str | Path | None, mapping: Any = None, key: Any = None) -> str:
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
            f"{line_of(origin, data)}label words must be a non-empty mapping label -> word or list of words, "
            f"e.g. {{negative: [bad], positive: [good, great]}}"
        )
    words: dict[str, list[str]] = {}
    for label, value in data.items():
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list) or not entries or not all(isinstance(w, str) and w.strip() for w in entries):
            raise RewriteError(f"{line_of(origin, data, label)}label {label!r} needs a word or a non-empty list of words")
        words[str(label)] = [w.strip() for w in entries]
    if len(words) < 2:
        raise RewriteError(f"{line_of(origin, data)}a verbalizer needs at least two labels, got {', '.join(words)}")
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
