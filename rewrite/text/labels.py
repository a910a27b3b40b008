"""Label words and PVP files: reading them (with file and line for every error), their token ids, how a
label's score averages its words' scores, and PET's pattern-verbalizer pairs (a pattern in the
template language of `rewrite.text.templates`, and label words per label).

A verbalizer maps each label to one or more words that are single tokens of the model's tokenizer:
`{negative: [bad, terrible], positive: [good, great]}`, inline, or in a YAML/JSON file (a PVP file's
`labels` section is accepted as one). The verbalizer pass and the PET recipe both read them here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import yaml

from rewrite.text.examples import Example
from rewrite.errors import RewriteError
from rewrite.text.templates import Template

MASK = "[MASK]"
SLOTS = ("text_a", "text_b")  # a PET pattern's fields: the text and the second text of a pair
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


def averaging_matrix(words: dict[str, list[Any]]) -> np.ndarray:
    """`[labels, all words]`: row l holds `1/n_l` at label l's words, so `scores = word_logits @ M.T`."""
    sizes = [len(ws) for ws in words.values()]
    matrix = np.zeros((len(sizes), sum(sizes)), dtype=np.float32)
    start = 0
    for row, size in enumerate(sizes):
        matrix[row, start:start + size] = 1.0 / size
        start += size
    return matrix


# --- pattern-verbalizer pairs (PET): a pattern in the template language and label words per label


@dataclass(frozen=True)
class PVP:
    """A pattern with `{text_a}` (and optionally `{text_b}`) and one `[MASK]`, and label words per label."""

    name: str
    pattern: str
    labels: dict[str, list[str]]
    origin: str = ""  # "file line N: " for messages

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def template(self) -> Template:
        """The pattern in the template language P-tuning templates share (`rewrite.text.templates`)."""
        return Template.parse(self.pattern, prompts=False)

    def fill(self, slots: dict[str, str]) -> str:
        """The pattern with its slots replaced (in one pass, so slot text is never read as a slot)."""
        return self.template.fill(slots)

    @property
    def used(self) -> set[str]:
        return set(self.template.fields)

    def render(self, example: Example, tokenizer, max_length: int) -> str:
        """The cloze text for `example`, its text slots cut (never the pattern) to fit `max_length` tokens,
        one token at a time from the longer slot (PET's rule; ties cut text_b)."""
        if "text_b" in self.used and example.pair is None:
            raise RewriteError(f"{self.origin}pattern {self.name!r} uses {{text_b}}, but {example.where} has no "
                               "second text; name its field (--pair-field)")
        text = self.template.render({"text_a": example.text, "text_b": example.pair or ""}, tokenizer, max_length,
                                    ties="last")
        if text is None:
            needed = len(tokenizer(self.fill({"text_a": "", "text_b": ""}))["input_ids"])
            raise RewriteError(
                f"{self.origin}pattern {self.name!r} alone needs {needed} tokens for {example.where}, more than "
                f"max_length {max_length}; truncation would cut the pattern or its [MASK]: raise max_length"
            )
        ids = tokenizer(text)["input_ids"]
        if ids.count(tokenizer.mask_token_id) != 1:
            raise RewriteError(f"{example.where}: the text contains the mask token {tokenizer.mask_token!r} itself "
                               f"({ids.count(tokenizer.mask_token_id)} masks in the patterned input); remove it from "
                               "the data")
        return text


def _check_pattern(pattern: Any, origin: str) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise RewriteError(f"{origin}a PVP needs a pattern: text with {{text_a}} and one {MASK}")
    masks = pattern.count(MASK)
    if masks != 1:
        found = "no" if masks == 0 else str(masks)
        raise RewriteError(f"{origin}pattern {pattern!r} has {found} {MASK}; a pattern needs exactly one")
    unknown = sorted(set(Template.parse(pattern, prompts=False).fields) - set(SLOTS))
    if unknown:
        raise RewriteError(f"{origin}pattern {pattern!r} has unknown slot {{{unknown[0]}}}; slots are {{text_a}} "
                           "and {text_b}")
    if "{text_a}" not in pattern:
        raise RewriteError(f"{origin}pattern {pattern!r} has no {{text_a}} slot for the input text")
    return pattern


def _pvp_entries(document: Any, path: Path) -> tuple[list[Any], Any]:
    """(entries, shared labels) of a PVP file: `{labels, pvps: [...]}`, or a bare list of PVPs."""
    if isinstance(document, list):
        return document, None
    if isinstance(document, dict) and isinstance(document.get("pvps"), list) and document["pvps"]:
        return document["pvps"], document.get("labels")
    raise RewriteError(f"{line_of(path, document)}a PVP file holds `pvps: [{{pattern: ..., labels: ...}}, ...]` "
                       "(with optional shared `labels`) or a list of PVPs")


def load_pvps(path: str | Path) -> list[PVP]:
    """Reads PVPs from YAML or JSON; every error names the file and line. All PVPs share one label set."""
    path = Path(path)
    if not path.is_file():
        raise RewriteError(f"PVP file {str(path)!r} does not exist")
    document = read_located(path)
    entries, shared = _pvp_entries(document, path)
    pvps = []
    for index, entry in enumerate(entries, 1):
        if not isinstance(entry, Located):
            raise RewriteError(f"{line_of(path, document, 'pvps')}PVP {index} must be a mapping with a pattern")
        origin = line_of(path, entry, "pattern")
        pattern = _check_pattern(entry.get("pattern"), origin)
        words = entry.get("labels", shared)
        if words is None:
            raise RewriteError(f"{origin}PVP {index} has no labels and the file has no shared `labels`")
        labels = parse_label_words(words, path)
        pvps.append(PVP(str(entry.get("name") or f"p{index}"), pattern, labels, origin))
    _check_same_labels(pvps)
    return pvps


def _check_same_labels(pvps: list[PVP]) -> None:
    names = pvps[0].label_names
    for pvp in pvps[1:]:
        if pvp.label_names != names:
            raise RewriteError(f"{pvp.origin}PVP {pvp.name!r} has labels {', '.join(pvp.label_names)} but "
                               f"{pvps[0].name!r} has {', '.join(names)}; every PVP needs the same labels in the "
                               "same order")
    if len({p.name for p in pvps}) != len(pvps):
        raise RewriteError(f"{pvps[0].origin}PVP names must be unique")


def check_label_words(pvps: Sequence[PVP], tokenizer) -> None:
    """Every label word must be one token; the error says how the tokenizer splits it."""
    for pvp in pvps:
        label_word_ids(tokenizer, pvp.labels, pvp.origin)
