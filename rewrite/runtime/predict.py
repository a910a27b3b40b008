"""Text in, predictions out, from an exported ONNX model in ONNX Runtime."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rewrite import runtime
from rewrite.errors import RewriteError
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.encoding import encode_texts
from rewrite.runtime.schema import ModelSchema
from rewrite.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_texts(texts: list[str]) -> None:
    """Command-line bytes that are not UTF-8 arrive as lone surrogates; say so rather than fail in the tokenizer."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RewriteError(f"text {text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8; "
                               "pass UTF-8 text") from None


def _limit(schema: ModelSchema, tokenizer) -> int | None:
    """The model's position limit for the input's own tokens: from its metadata, else the tokenizer's."""
    if schema.max_positions:
        return schema.max_positions - schema.prepended
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else None


def _fit(encoded: dict[str, np.ndarray], texts: list[str], limit: int | None, truncate: bool) -> dict[str, np.ndarray]:
    """Cuts inputs to the model's positions (with a warning), or refuses them."""
    length = encoded["input_ids"].shape[1]
    if limit is None or length <= limit:
        return encoded
    longest = int(encoded["attention_mask"].sum(axis=1).argmax())
    if not truncate:
        raise RewriteError(f"text {texts[longest][:40]!r}... is {length} tokens but the model takes at most {limit}; "
                           "shorten it, or drop --no-truncate to cut it")
    log.warning("text %r... is %d tokens; cut to the model's %d positions", texts[longest][:40], length, limit)
    return {name: value[:, :limit] for name, value in encoded.items()}


def _tokenizer(path: Path, tokenizer_dir: str | None) -> Tokenizer:
    """The tokenizer saved in `tokenizer_dir`, else beside the model."""
    return Tokenizer.from_pretrained(Path(tokenizer_dir) if tokenizer_dir else path.parent)


def _top(scores: np.ndarray, names, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores)[:k]
    return [(names(int(i)), float(scores[i])) for i in order]


class Predictor:
    """An exported model with its session, tokenizer and metadata, loaded once for many calls (a server's)."""

    def __init__(self, model_path: str | Path, tokenizer_dir: str | None = None, threads: int | None = None):
        self.path = Path(model_path)
        self.schema = ModelSchema.read(self.path)
        self.tokenizer = _tokenizer(self.path, tokenizer_dir)
        self.session = runtime.session(self.path, threads)

    def predict(self, texts: list[str], *, top_k: int = 5, truncate: bool = True, adapters: Adapters | None = None):
        """Per text, the top predictions as (label, probability): classes, masked tokens or next tokens.

        Texts longer than the model's positions are cut (with a warning), or refused with `truncate=False`.
        `adapters` fill a slotted model's adapter slots (see `rewrite.export.onnx_adapters`)."""
        _check_texts(texts)
        schema, tokenizer, adapters = self.schema, self.tokenizer, adapters or Adapters()
        untrained = set(schema.untrained)
        untrained -= adapters.carried_modules(self.path) if untrained else set()
        if untrained:
            log.warning("%s: the classification head %s was never trained (fresh random weights); its predictions "
                        "mean nothing until `rewrite train`", self.path, ", ".join(sorted(untrained)))
        feeds, options, _loaded = adapters.run_inputs(self.path, len(texts))
        encoded = _fit(encode_texts(schema, tokenizer, texts), texts, _limit(schema, tokenizer), truncate)
        first = next(iter(runtime.run(self.session, encoded | feeds, options).values()))
        if schema.task != "seq-cls":  # per-position outputs: drop the positions prompt tuning put before the input's
            first = first[:, schema.prepended:]
        return [self._top(first[row], encoded, row, texts[row], top_k) for row in range(len(texts))]

    def _top(self, output: np.ndarray, encoded: dict[str, np.ndarray], row: int, text: str, top_k: int):
        task, tokenizer = self.schema.task, self.tokenizer
        token = lambda i: tokenizer.convert_ids_to_tokens(i)  # noqa: E731
        if task == "seq-cls":
            return _top(_softmax(output), lambda i: self.schema.labels.get(i, str(i)), top_k)
        if task == "masked-lm":
            masks = np.flatnonzero(encoded["input_ids"][row] == tokenizer.mask_token_id)
            if not len(masks):
                raise RewriteError(f"text {text!r} has no {tokenizer.mask_token} token to predict")
            return _top(_softmax(output[masks[0]]), token, top_k)
        if task == "causal-lm":
            last = int(encoded["attention_mask"][row].nonzero()[0][-1])
            return _top(_softmax(output[last]), token, top_k)
        pooled = output[encoded["attention_mask"][row].astype(bool)].mean(axis=0)
        return [("embedding norm", float(np.linalg.norm(pooled)))]


def predict(model_path: str | Path, texts: list[str], *, tokenizer_dir: str | None = None, top_k: int = 5,
            truncate: bool = True, adapters: Adapters | None = None):
    """`Predictor.predict` on a model loaded for this one call."""
    return Predictor(model_path, tokenizer_dir).predict(texts, top_k=top_k, truncate=truncate, adapters=adapters)
