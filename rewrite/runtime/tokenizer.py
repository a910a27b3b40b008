"""The model's tokenizer without transformers: `tokenizer.json` read by the `tokenizers` library, with the
special tokens, position limit and padding side of `tokenizer_config.json` (and `special_tokens_map.json`),
offering what serving uses of a Hugging Face tokenizer (calls with and without special tokens, offsets,
padding, decoding, token lookups).

It encodes as the saved `tokenizer.json` says, always: that is the tokenizer the model was captured with
and trained on. (transformers 5 may rebuild some architectures' tokenizers from their vocabulary instead,
e.g. `Qwen2Tokenizer` beside a Qwen2 config, ignoring the saved file.) A directory without one is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer as Backend

from rewrite.errors import RewriteError
from rewrite.text.examples import pad_rows

SPECIAL = ("pad", "eos", "bos", "unk", "mask", "cls", "sep")
_NO_LIMIT = int(1e30)  # transformers' "no limit" for a tokenizer that names none


def _content(token: Any) -> str | None:
    """A special token as configs write it: text, or an added-token object with `content`."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RewriteError(f"{str(path)!r} could not be read as JSON ({error}); save the tokenizer again") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A saved fast tokenizer, as serving calls it (a subset of transformers' tokenizer API)."""

    def __init__(self, backend: Backend, config: dict[str, Any], origin: str = "tokenizer"):
        self.backend, self.origin = backend, origin
        backend.no_truncation()  # transformers ignores a saved truncation or padding unless asked for one
        backend.no_padding()
        for kind in SPECIAL:
            token = _content(config.get(f"{kind}_token"))
            setattr(self, f"{kind}_token", token)
            setattr(self, f"{kind}_token_id", backend.token_to_id(token) if token is not None else None)
        self.model_max_length = int(config.get("model_max_length") or _NO_LIMIT)
        self.padding_side = config.get("padding_side") or "right"

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """The tokenizer saved in `directory` (by `save_pretrained` of a fast tokenizer)."""
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise RewriteError(f"no tokenizer.json in {str(directory)!r}; pass --tokenizer with the directory the "
                               "model's fast tokenizer was saved to (its save_pretrained writes tokenizer.json)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as error:  # the tokenizers library raises its own Exception for unreadable files
            raise RewriteError(f"{str(file)!r} is not a tokenizer the tokenizers library can read ({error}); save "
                               "the tokenizer again with save_pretrained") from None
        config = _read_json(directory / "special_tokens_map.json") | _read_json(directory / "tokenizer_config.json")
        return cls(backend, config, str(directory))

    def __call__(self, texts: str | Sequence[str], *, add_special_tokens: bool = True, padding: bool = False,
                 return_offsets_mapping: bool = False, return_tensors: str | None = None) -> dict[str, Any]:
        """`input_ids`, `token_type_ids`, `attention_mask` (and `offset_mapping`) of one text (lists) or of
        several (a list per text; padded to the longest with `padding`; numpy arrays with `return_tensors="np"`)."""
        single = isinstance(texts, str)
        encodings = self.backend.encode_batch([texts] if single else list(texts), add_special_tokens=add_special_tokens)
        result = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                  "attention_mask": [e.attention_mask for e in encodings]}
        if return_offsets_mapping:
            result["offset_mapping"] = [e.offsets for e in encodings]
        if padding and len({len(row) for row in result["input_ids"]}) > 1:
            result = self._pad(result)
        if return_tensors == "np":
            return {name: np.asarray(rows, dtype=np.int64) for name, rows in result.items()}
        return {name: rows[0] for name, rows in result.items()} if single else result

    def _pad(self, result: dict[str, list]) -> dict[str, list]:
        if self.pad_token_id is None:
            raise RewriteError(f"the tokenizer in {self.origin!r} has no padding token to pad texts of different "
                               "lengths with; give one text at a time or save the tokenizer with a pad_token")
        left, width = self.padding_side == "left", max(map(len, result["input_ids"]))
        padded = {name: pad_rows(result[name], self.pad_token_id if name == "input_ids" else 0, left).tolist()
                  for name in ("input_ids", "token_type_ids", "attention_mask")}
        if "offset_mapping" in result:  # padding has no characters: (0, 0), as transformers gives it
            fill = [[(0, 0)] * (width - len(row)) for row in result["offset_mapping"]]
            padded["offset_mapping"] = [f + row if left else row + f for f, row in zip(fill, result["offset_mapping"])]
        return padded

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([[int(i) for i in row] for row in rows],
                                         skip_special_tokens=skip_special_tokens)
