"""Text generation in ONNX Runtime over a model exported with a KV cache (`export_onnx(gm, path, cache=True)`).

One session runs the prefill (past length 0, each row's last logits only where the model can) and every decoding
step, over the cache `rewrite.runtime.cache.open_cache` gives (held in place on a lowered model). Texts are batched with padding on the
side the model's cache layout names (`rewrite.runtime.cache`: right, except for a prompt-tuned prefix) and
positions follow Hugging Face's `generate` (`cumsum(mask) - 1`, then one more per step);
rows that reached an end-of-sequence id are filled with the padding id until every row is done, as
`generate` does. Everything the loop needs (cache layout, special ids, position limit, P-tuning
template) is read from the model's metadata. A model exported with adapter slots generates with the adapter
files given (`Adapters`: one active, or stacked with one index per row), the same feeds on every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rewrite import runtime
from rewrite.errors import RewriteError
from rewrite.runtime.adapters import Adapters
from rewrite.runtime.cache import feed, keeps_last, last_only_feed, last_real, open_cache, positions
from rewrite.runtime.encoding import encode_texts
from rewrite.runtime.predict import _check_texts, _tokenizer
from rewrite.runtime.schema import ModelSchema
from rewrite.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """Greedy unless `do_sample`; then temperature, top-k (0: off) and nucleus top-p, in `generate`'s order."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise RewriteError(f"temperature {self.temperature!r} is not allowed; use a number above 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RewriteError(f"top_k {self.top_k!r} is not allowed; use a whole number of at least 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise RewriteError(f"top_p {self.top_p!r} is not allowed; use a number in (0, 1]")

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The next token of each row from its last-position logits `[batch, vocab]`."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = -np.sort(-scores, axis=-1)[:, min(self.top_k, scores.shape[-1]) - 1:][:, :1]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = _softmax(scores)
        if self.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            ranked = np.take_along_axis(probs, order, -1)
            drop = np.cumsum(ranked, -1) - ranked >= self.top_p  # keeps the smallest set reaching top_p
            np.put_along_axis(probs, order, np.where(drop, 0.0, ranked), -1)
            probs /= probs.sum(-1, keepdims=True)
        draws = rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, -1) < draws).sum(-1), probs.shape[-1] - 1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Generation:
    """New token ids per row `[batch, steps]` (padding after a row's end), their texts, and per-step logits."""

    token_ids: np.ndarray
    texts: list[str]
    logits: list[np.ndarray] = field(default_factory=list)


class CachedModel:
    """An exported causal LM with a cache, its tokenizer, what its metadata says, and the adapters it runs with.
    `huge_pages`: its weights in huge pages (`rewrite.runtime.huge_pages`), for a model kept to generate again and
    again (the server): each token then costs less, the load more (on the 124.7M LLaMA shape, 0.2 s more in int4,
    1.1 s in fp32)."""

    def __init__(self, model_path: str | Path, tokenizer_dir: str | None = None, threads: int | None = None,
                 adapters: Adapters | None = None, huge_pages: bool = True):
        path = Path(model_path)
        self.schema = ModelSchema.read(path)
        self.layout = self.schema.require_cache()
        self.special = self.schema.special_ids
        self.limit = self.schema.max_positions
        self.path, self.tokenizer_dir = path, tokenizer_dir
        self.session = runtime.session(path, threads, huge_pages)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.keeps_last = keeps_last(self.session)
        self.adapters = adapters or Adapters()

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer beside the model, padding on the side its cache layout names."""
        tokenizer = _tokenizer(self.path, self.tokenizer_dir)
        tokenizer.padding_side = self.layout.padding
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = self.special["pad_token_id"]
        return tokenizer

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded ids and mask (through the P-tuning template when the model has one)."""
        encoded = encode_texts(self.schema, self.tokenizer, list(texts))
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def check_length(self, prompt: int, max_new_tokens: int) -> None:
        total = prompt + self.layout.prefix + max_new_tokens
        if self.limit is not None and total > self.limit:
            prefix = f" and {self.layout.prefix} virtual tokens" if self.layout.prefix else ""
            raise RewriteError(
                f"a prompt of {prompt} tokens{prefix} plus {max_new_tokens} new tokens needs {total} positions, "
                f"more than the model's {self.limit}; shorten the text or lower max_new_tokens"
            )

    def adapter_feeds(self, rows: int) -> tuple:
        """What `Adapters.run_inputs` gives for `rows` (a model without slots and no adapter files: nothing)."""
        if self.schema.slots is None and self.adapters == Adapters():
            return {}, None, None
        return self.adapters.run_inputs(self.path, rows)

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray],
             adapter_feeds: tuple = ({}, None, None)):
        """Each row's logits at its last real token and the new cache (`adapter_feeds`: what
        `Adapters.run_inputs` gave)."""
        feeds, options, _loaded = adapter_feeds
        last = last_only_feed(ids.shape[1]) if self.keeps_last else {}
        values = self.session.run(self.outputs, feed(self.layout, ids, mask, positions, past) | feeds | last, options)
        return last_logits(values[0], mask), values[1:]


def last_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's logits at its last real token `[batch, vocab]`, from a step's logits over its tokens or, from a
    model that computed only those (`LAST_ONLY`), over one position."""
    if logits.shape[1] == 1:
        return logits[:, 0].astype(np.float32, copy=False)
    return logits[np.arange(len(logits)), last_real(mask[:, -logits.shape[1]:])].astype(np.float32, copy=False)


def stream(model: CachedModel, texts: Sequence[str], **options) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields `(tokens [batch], logits [batch, vocab])` per step as they are produced (options: `stream_ids`')."""
    if not texts:
        raise RewriteError("no texts to generate from; pass at least one text")
    _check_texts(list(texts))
    return stream_ids(model, *model.encode(texts), **options)


def _refuse_empty_prompts(model: CachedModel, mask: np.ndarray) -> None:
    """A prompt of no tokens has nothing to prefill (ONNX Runtime would fail inside the model)."""
    empty = np.flatnonzero(mask.sum(-1) == 0)
    if empty.size:
        raise RewriteError(
            f"text {empty[0] + 1} of {len(mask)} encodes to no tokens with the model's tokenizer "
            f"({model.tokenizer.origin}/tokenizer.json); generation needs at least one prompt token: pass text in "
            "that tokenizer's vocabulary"
        )


def stream_ids(model: CachedModel, ids: np.ndarray, mask: np.ndarray, *, max_new_tokens: int = 20,
               sampling: Sampling = Sampling(), eos: int | Sequence[int] | None = None):
    """`stream` from padded ids and mask (padded on the side `model.layout.padding` names). `eos` None: the model's end-of-sequence ids; an empty
    list: never stop early."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RewriteError(f"max_new_tokens {max_new_tokens!r} is not allowed; use a whole number of at least 1")
    stops = np.asarray(model.special["eos_token_id"] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))
    pad = model.special["pad_token_id"] if model.special["pad_token_id"] is not None else 0
    _refuse_empty_prompts(model, mask)
    model.check_length(ids.shape[1], max_new_tokens)
    position_ids = positions(mask)
    feeds, options, _loaded = model.adapter_feeds(ids.shape[0])
    cache = open_cache(model.session, model.layout, ids.shape[0], ids.shape[1] + max_new_tokens, feeds, options)
    rng = np.random.default_rng(sampling.seed)
    running = np.ones(ids.shape[0], dtype=bool)
    # the mask of every step is a view of one buffer (rows that are done still take a position, as in `generate`)
    grown = np.ones((ids.shape[0], ids.shape[1] + max_new_tokens - 1), dtype=mask.dtype)
    grown[:, :ids.shape[1]] = mask
    lengths = mask.sum(-1, keepdims=True)
    for step in range(max_new_tokens):
        logits = last_logits(cache.run(ids, mask, position_ids), mask)
        tokens = np.where(running, sampling.pick(logits, rng), pad)
        yield tokens, logits
        running &= (tokens[:, None] != stops).all(-1)
        if not running.any():
            return
        ids, position_ids, mask = tokens[:, None], lengths + step, grown[:, :mask.shape[1] + 1]


def generate(model_path: str | Path, texts: Sequence[str], *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos: int | Sequence[int] | None = None,
             seed: int | None = None, tokenizer_dir: str | None = None, keep_logits: bool = False,
             adapters: Adapters | None = None) -> Generation:
    """Continues each text with up to `max_new_tokens` tokens from an ONNX model exported with a cache
    (`adapters`: the adapter files a model exported with slots runs with)."""
    sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
    model = CachedModel(model_path, tokenizer_dir, adapters=adapters, huge_pages=False)  # one run: a cheaper load
    steps, logits = [], []
    for tokens, step_logits in stream(model, texts, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos):
        steps.append(tokens)
        if keep_logits:
            logits.append(step_logits)
    token_ids = np.stack(steps, 1)
    return Generation(token_ids, model.tokenizer.batch_decode(token_ids, skip_special_tokens=True), logits)
