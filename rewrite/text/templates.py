"""Templates, the one template language of P-tuning templates and PET patterns:
`"[P] [P] [P] {text} [P] [MASK] ."` -> token ids with prompt placeholders in place, and
`"{text_a} It was [MASK] ."` -> the cloze text PET trains on.

`[P]` marks a continuous prompt vector (the i-th `[P]` is prompt slot i), `{name}` a field filled from
the example, and everything else is literal text. Pieces are tokenized one by one (as PET and
OpenPrompt do), so a placeholder never merges with its neighbours, and the tokenizer's own special
tokens (`[CLS] ... [SEP]`, `<s>`) frame the result. Bracketed tokens in the literal text (`[MASK]`,
`<mask>`) must be single tokens of this tokenizer: a template written for another tokenizer is an
error, not a silently different prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping, NamedTuple, Sequence

import numpy as np

from rewrite.errors import RewriteError
from rewrite.text.examples import Example, pad_ids  # training's padding, so batches agree

PLACEHOLDER = "[P]"
Truncation = Literal["first", "last"]  # which of equally long fields loses a token first
PAIR_FIELDS = ("text_b", "pair")  # template fields that take the second text of a pair; others take the text
_FIELD = re.compile(r"\{([^{}]*)\}")
_PIECE = re.compile(r"(\[P\]|\{[^{}]*\})")
_BRACKETED = re.compile(r"\[[^\[\]\s]+\]|<[^<>\s]+>")
_PROBE = "a"


class FilledTemplate(NamedTuple):
    """One example through a template: its ids, how many placeholder ids its own text held, whether it was cut."""

    ids: list[int]
    clashes: int
    truncated: bool


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text, prompt slots and fields, in order."""

    source: str
    parts: tuple[tuple[str, str | int], ...]

    @classmethod
    def parse(cls, source: str, *, prompts: bool = True) -> "Template":
        """Splits `source` into ("text", str), ("slot", index) and ("field", name) parts; with `prompts`
        (P-tuning) it must have a `[P]` slot and a field."""
        parts: list[tuple[str, str | int]] = []
        slots = 0
        for piece in _PIECE.split(source):
            if piece == PLACEHOLDER:
                parts.append(("slot", slots))
                slots += 1
            elif _PIECE.fullmatch(piece):
                parts.append(("field", piece[1:-1]))
            elif piece.strip():
                parts.append(("text", piece.strip()))
        template = cls(source, tuple(parts))
        if not prompts:
            return template
        if not template.prompt_count:
            raise RewriteError(f"template {source!r} has no {PLACEHOLDER} placeholder; write e.g. "
                               f"'[P] [P] [P] {{text}} [P] [MASK] .'")
        if not template.fields:
            raise RewriteError(f"template {source!r} has no field for the input; put {{text}} where the text goes")
        return template

    @property
    def prompt_count(self) -> int:
        return sum(kind == "slot" for kind, _ in self.parts)

    @property
    def fields(self) -> list[str]:
        return [value for kind, value in self.parts if kind == "field"]

    def fill(self, values: Mapping[str, str]) -> str:
        """The template as text with its fields replaced (in one pass, so field text is never read as a field)."""
        return _FIELD.sub(lambda match: values[match.group(1)], self.source)

    def render(self, values: Mapping[str, str], tokenizer, max_length: int,
               ties: Truncation = "last") -> str | None:
        """The filled template as text of at most `max_length` tokens: fields are shortened one token at a
        time from the longest (`shorten`, on ties the field `ties` in name order: PET's rule), by
        character offsets, never the template's own text. None when the template alone is too long."""
        names = sorted(set(self.fields))
        while True:
            text = self.fill(values)
            excess = len(tokenizer(text)["input_ids"]) - max_length
            if excess <= 0:
                return text
            lengths = {name: len(_ids(tokenizer, values[name])) for name in names}
            if not any(lengths.values()):
                return None
            kept = shorten(lengths, excess, ties)
            values = {name: _cut(tokenizer, value, kept[name]) if name in kept else value
                      for name, value in values.items()}

    def check(self, tokenizer) -> None:
        """Every bracketed token in the literal text must be one token of `tokenizer` (`[MASK]`, not `<mask>`)."""
        for kind, value in self.parts:
            if kind != "text":
                continue
            for token in _BRACKETED.findall(value):
                pieces = tokenizer.tokenize(token)
                if len(pieces) != 1:
                    raise RewriteError(
                        f"template token {token!r} is split by the tokenizer into {len(pieces)} tokens "
                        f"({' '.join(pieces)}); use this tokenizer's own tokens, e.g. {tokenizer.mask_token!r}"
                    )

    def encode(self, tokenizer, prompt_ids: Sequence[int], values: Mapping[str, str] | str,
               max_length: int | None = None) -> FilledTemplate:
        """Token ids of one example and how many prompt ids its fields contained (they become prompt vectors).

        With `max_length` the longest field is cut from its end until the whole fits (`shorten`, on ties
        the field first in the template); the template itself is never cut, so its `[MASK]` and
        prompts survive truncation.
        """
        values = {self.fields[0]: values} if isinstance(values, str) else values
        missing = [name for name in self.fields if name not in values]
        if missing:
            raise RewriteError(f"template {self.source!r} needs field {', '.join(missing)}, which the example lacks")
        fields = {name: _ids(tokenizer, values[name]) for name in self.fields}
        prefix, suffix = special_frame(tokenizer)
        truncated = max_length is not None and _fit(
            fields, max_length - len(prefix) - len(suffix) - self._fixed_length(tokenizer), self.source)
        ids = list(prefix)
        for kind, value in self.parts:
            if kind == "slot":
                ids.append(prompt_ids[value])
            elif kind == "field":
                ids.extend(fields[value])
            else:
                ids.extend(_ids(tokenizer, value))
        reserved = set(prompt_ids)
        clashes = sum(token in reserved for tokens in fields.values() for token in tokens)
        return FilledTemplate(ids + list(suffix), clashes, truncated)

    def _fixed_length(self, tokenizer) -> int:
        return sum(1 if kind == "slot" else len(_ids(tokenizer, value)) for kind, value in self.parts if kind != "field")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def shorten(lengths: Mapping[str, int], excess: int, ties: Truncation = "first") -> dict[str, int]:
    """The truncation rule: `excess` tokens fewer, taken one at a time from the longest field; on ties from
    the first or the last field in `lengths`' order."""
    lengths = dict(lengths)
    order = list(lengths) if ties == "first" else list(reversed(lengths))
    for _ in range(max(excess, 0)):
        longest = max(order, key=lambda name: lengths[name])
        lengths[longest] = max(lengths[longest] - 1, 0)
    return lengths


def _fit(fields: dict[str, list[int]], room: int, source: str) -> bool:
    """Cuts fields from their ends (`shorten`) until they hold at most `room` tokens; True if it cut."""
    if room < len(fields):
        raise RewriteError(f"template {source!r} alone fills the maximum length; shorten it or allow longer inputs")
    excess = sum(map(len, fields.values())) - room
    kept = shorten({name: len(ids) for name, ids in fields.items()}, excess)
    for name, count in kept.items():
        fields[name] = fields[name][:count]
    return excess > 0


def _cut(tokenizer, text: str, keep: int) -> str:
    """`text` up to the end of its `keep`-th token (character offsets of the fast tokenizer)."""
    if keep <= 0:
        return ""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[:offsets[keep - 1][1]] if keep < len(offsets) else text


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (`[CLS]`/`[SEP]`, `<s>`, none)."""
    framed = tokenizer(_PROBE)["input_ids"]
    bare = _ids(tokenizer, _PROBE)
    for start in range(len(framed) - len(bare) + 1):
        if framed[start:start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare):]
    raise RewriteError("the tokenizer's special tokens could not be located around a plain word; "
                       "this tokenizer cannot be used with templates")


def pad_batch(rows: Sequence[Sequence[int]], tokenizer) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask` and `token_type_ids` (zeros) for encoded rows, padded as training pads."""
    batch = pad_ids(rows, tokenizer)
    return {**batch, "token_type_ids": np.zeros_like(batch["input_ids"])}


def example_values(template: Template, example: Example) -> dict[str, str]:
    """A training example's texts by template field: `{text_b}` (or `{pair}`) takes the pair's second
    text, every other field the text."""
    pair_fields = [name for name in template.fields if name in PAIR_FIELDS]
    if example.pair is not None and not pair_fields:
        raise RewriteError(f"{example.where}: the data has text pairs but template {template.source!r} has no "
                           f"{{text_b}} field for the second text")
    if example.pair is None and pair_fields:
        raise RewriteError(f"{example.where}: template {template.source!r} has a {{{pair_fields[0]}}} field but the "
                           "data has no second text; name its column (--pair-field)")
    return {name: example.pair if name in PAIR_FIELDS else example.text for name in template.fields}
