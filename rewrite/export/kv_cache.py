"""Causal LMs with a KV cache: the graph to export for generation, built from a captured graph.

The base model is captured again, this time with its cache as graph inputs and outputs
(`past_key_values.{i}.key/value` in, `present.{i}.key/value` out), the graph's pass history is replayed
on that capture, and the captured graph's own tensors (trained, folded) are shared into it. Why a
re-capture and not a rewrite of the cacheless graph: where positions and masks come from differs per
architecture (LLaMA/Qwen2 rotary positions, GPT-2's absolute and OPT's offset-by-2 learned positions,
BLOOM's alibi built from the mask, each model's causal-mask builder for an offset query), and the
model's own code is the reference for all of them; replaying the passes keeps what they did, since a
pass finds its sites by module path and role, which the cache does not change.

A pass whose rewrite cannot be replayed on a cache (prompt tuning prepends virtual tokens, which must
enter once, not on every decoding step) says so through `Pass.cache_prefix`: its virtual tokens'
keys and values depend on nothing but the trained table, so they are computed once here and become a
constant prefix of every layer's cache inside the model (attended on every step, as PEFT's cache
holds them after prefill; the cache the caller passes around holds only real tokens).

Every layer's cache keeps every position, sliding-window layers (Mistral, Gemma 2/3, Qwen2 with
`use_sliding_window`) included: Hugging Face's sliding cache layer keeps only the window and branches on the
cache's length, which a dynamic past length cannot capture, while the model's own mask builder applies the
window to a full cache by absolute position; tokens outside the window are masked, as `generate`'s cache
drops them.

One model serves prefill (past length 0) and decoding, as Optimum's merged decoder does. Adapter slots
(`rewrite.export.onnx_adapters`) go on the cached graph after the replay, named and checked as the plain export's;
a prompt table cannot be one, since its prefix is computed here, at export.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rewrite import runtime
from rewrite.graph.capture import drop_guards
from rewrite.errors import RewriteError
from rewrite.graph.query import word_embedding
from rewrite.graph.ir import RewriteGraph, info, wrap
from rewrite.export.lowering.attention import window
from rewrite.export.onnx_adapters import SlotExport
from rewrite.graph.pipeline import Pipeline, capable, create
from rewrite.graph.signature import Compare, Signature, vocab_size
from rewrite.runtime.cache import CacheLayout, open_cache, positions
from rewrite.runtime.schema import ModelSchema, cache_metadata

aten = torch.ops.aten

PREFIX = "rewrite_cache_prefix"
_PROBE = dict(batch=2, seq=3, past=4)


def _causal_model(gm: fx.GraphModule) -> nn.Module:
    """The graph's Hugging Face model class with zero weights (the graph's own tensors replace them after the
    passes are replayed: replaying on shared tensors would let a fold write into the caller's weights)."""
    config = info(gm).config
    if info(gm).task != "causal-lm" or config is None or not hasattr(config, "model_type"):
        raise RewriteError(
            f"a KV-cache export needs a causal language model captured from a Hugging Face model; this graph's "
            f"task is {info(gm).task!r}; export it without the cache"
        )
    import transformers

    dtype = next(gm.parameters()).dtype
    config = copy.deepcopy(config)
    config.use_cache = True
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    for parameter in model.parameters():
        parameter.detach().zero_()
    buffers = dict(gm.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if name in buffers:
            buffer.copy_(buffers[name])
    return model.eval()


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _takes_position_ids(model: nn.Module) -> bool:
    """As Hugging Face's `generate` decides whether to pass `position_ids` (PEFT drops them under a prompt)."""
    return "position_ids" in inspect.signature(model.forward).parameters


def _cached_class(base: type, layers: int, cache_kwarg: str) -> type:
    """`base` with a forward over flat cache tensors: a DynamicCache goes in, logits and presents come out.

    The prefix buffer (virtual tokens' keys and values), when present, is put in front of every layer's
    past and its positions in front of the mask, then cut from the presents. The cache is built without the
    config, so every layer is a full one (see the module's docstring on sliding windows).
    """
    from transformers import DynamicCache

    class Cached(base):
        def forward(self, input_ids, attention_mask, position_ids=None, past=()):
            batch = input_ids.shape[0]
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            prefix = getattr(self, PREFIX, None)
            count = 0 if prefix is None else prefix.shape[-2]
            if count:
                attention_mask = torch.cat([attention_mask.new_ones(batch, count), attention_mask], 1)
                pairs = [tuple(torch.cat([prefix[i, j].expand(batch, -1, -1, -1), pair[j]], 2) for j in (0, 1))
                         for i, pair in enumerate(pairs)]
            cache = DynamicCache(ddp_cache_data=pairs)
            extra = {} if position_ids is None else {"position_ids": position_ids}
            out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                               **{cache_kwarg: cache}, **extra)
            result = {"logits": out.logits}
            for i, layer in enumerate(out.past_key_values.layers):
                result[f"present.{i}.key"] = layer.keys[:, :, count:]
                result[f"present.{i}.value"] = layer.values[:, :, count:]
            return result

    Cached.__name__ = Cached.__qualname__ = f"Cached{base.__name__}"
    return Cached


def _padding(config, layers: int, position_ids: bool) -> str:
    """Right where the model reads every position from the mask and position ids; left where it numbers positions
    from its cache length (a prefix) or slides a window over cache slots (padding inside a row would fill it)."""
    sliding = any(window(config, layer) > 0 for layer in range(layers))
    return "right" if position_ids and not sliding else "left"


def _probe_layout(model: nn.Module, position_ids: bool, prefix: int) -> CacheLayout:
    """Shapes of one layer's cache, read off a two-token run."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    keys = layers[0].keys
    return CacheLayout(len(layers), keys.shape[1], keys.shape[3], str(keys.dtype).removeprefix("torch."),
                       position_ids, prefix, _padding(model.config, len(layers), position_ids))


def example_inputs(layout: CacheLayout, vocab: int, batch: int, seq: int, past: int, seed: int = 0) -> dict:
    """Random ids after `past` cached positions: the keyword inputs of a cached graph."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
              "attention_mask": torch.ones(batch, past + seq, dtype=torch.long)}
    if layout.position_ids:
        inputs["position_ids"] = torch.arange(past, past + seq).expand(batch, -1).contiguous()
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    inputs["past"] = tuple(torch.randn(shape, generator=generator).to(dtype) for _ in layout.past_names())
    return inputs


def dynamic_shapes(layout: CacheLayout, names: bool = False) -> dict:
    """Dynamic batch, sequence, total and past lengths (names for ONNX, `Dim`s for `torch.export`)."""
    if names:
        batch, seq, total, past = "batch", "sequence", "total_sequence", "past_sequence"
    else:
        batch = seq = total = torch.export.Dim.AUTO
        past = torch.export.Dim("past", min=0)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}}
    if layout.position_ids:
        shapes["position_ids"] = {0: batch, 1: seq}
    shapes["past"] = tuple({0: batch, 2: past} for _ in layout.past_names())
    return shapes


def _capture(model: nn.Module, gm: fx.GraphModule, prefix: torch.Tensor | None) -> RewriteGraph:
    """The model with a cache, captured with dynamic batch, lengths and past length (0 included)."""
    position_ids = _takes_position_ids(model) and prefix is None
    layout = _probe_layout(model, position_ids, 0 if prefix is None else prefix.shape[-2])
    base = type(model)
    model.__class__ = _cached_class(base, layout.layers, _cache_kwarg(model))
    if prefix is not None:
        model.register_buffer(PREFIX, prefix)
    try:
        inputs = example_inputs(layout, 2, **_PROBE)
        exported = torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes(layout), strict=False)
    finally:
        model.__class__ = base
        if prefix is not None:
            delattr(model, PREFIX)
    unlifted = exported.module()
    drop_guards(unlifted)
    meta = dataclasses.replace(info(gm), history=[], input_names=[k for k in inputs if k != "past"],
                               trainable=list(info(gm).trainable), cache=layout)
    cached = wrap(unlifted, unlifted.graph, meta, False)
    cached.graph.lint()
    cached.recompile()
    return cached


class CachePrefix(Protocol):
    """A pass whose tokens an export with a cache turns into a constant cache prefix instead of replaying it."""

    @classmethod
    def cache_prefix(cls, gm: fx.GraphModule, runs: Sequence[Any]) -> torch.Tensor | None:
        """Embeddings `[n, hidden]` the runs put in front of every input of `gm`, or None."""


def _prefixes(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Pass name -> the embeddings it puts in front of every input (those passes are not replayed)."""
    found = {cls.name: cls.cache_prefix(gm, runs) for cls, runs in capable(gm, CachePrefix)}
    return {name: prefix for name, prefix in found.items() if prefix is not None}


def _replay(cached: RewriteGraph, gm: fx.GraphModule) -> None:
    """Every pass of `gm`'s history that can run on a cache, with its recorded options."""
    skipped = _prefixes(gm)
    entries = [h for h in info(gm).history if h["pass"] not in skipped]
    if entries:
        Pipeline([create(h["pass"], **h["options"]) for h in entries]).run(cached)
    info(cached).history = list(info(gm).history)


def _share_tensors(cached: fx.GraphModule, gm: fx.GraphModule) -> None:
    """`cached` reads `gm`'s parameters and buffers (the same tensor objects: trained values, no copies)."""
    source = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    missing = []
    for name, tensor in [*cached.named_parameters(remove_duplicate=False), *cached.named_buffers(remove_duplicate=False)]:
        owner_path, _, attr = name.rpartition(".")
        owner = cached.get_submodule(owner_path) if owner_path else cached
        if name in source:
            store = owner._parameters if attr in owner._parameters else owner._buffers
            store[attr] = source[name]
        elif isinstance(tensor, nn.Parameter):
            missing.append(name)
    if missing:
        raise RewriteError(
            f"the graph with a cache has parameters the captured graph lacks ({', '.join(missing[:3])}); "
            "its pass history could not be replayed on the cached model"
        )


def _prefix_cache(cached: RewriteGraph, embeddings: torch.Tensor) -> torch.Tensor:
    """Every layer's keys and values for the virtual tokens, `[layers, 2, 1, heads, n, head_dim]`: the
    cached graph run once with its word-embedding lookup reading the prompt table instead."""
    embed = word_embedding(cached, "the prompt's keys and values are computed through it")
    cached.register_buffer("rewrite_prompt_rows", embeddings)
    with cached.graph.inserting_before(embed):
        rows = cached.graph.get_attr("rewrite_prompt_rows")
        lookup = cached.graph.call_function(torch.ops.aten.embedding.default, (rows, embed.args[1]))
    embed.replace_all_uses_with(lookup)  # a float lookup, whether the word embeddings are quantized or not
    cached.graph.erase_node(embed)
    cached.recompile()
    layout: CacheLayout = info(cached).cache
    count = embeddings.shape[0]
    inputs = example_inputs(layout, 1, batch=1, seq=count, past=0)
    inputs["input_ids"] = torch.arange(count).unsqueeze(0)
    with torch.no_grad():
        out = cached(**inputs)
    return torch.stack([torch.stack([out[f"present.{i}.{kind}"] for kind in ("key", "value")])
                        for i in range(layout.layers)])


def cached_graph(gm: fx.GraphModule) -> RewriteGraph:
    """`gm` (every pass applied, in eval mode) as a graph over a KV cache, sharing `gm`'s tensors.

    Inputs: `input_ids`, `attention_mask` (past and new positions), `position_ids` where the model
    takes them, and `past` (per layer key then value, `[batch, kv_heads, past, head_dim]`); outputs:
    `logits` and `present.{i}.key/value`.
    """
    model = _causal_model(gm)
    prefixes = list(_prefixes(gm).values())
    cached = _capture(model, gm, None)
    _replay(cached, gm)
    _share_tensors(cached, gm)
    if prefixes:
        prefix = _prefix_cache(cached, torch.cat(prefixes))
        cached = _capture(model, gm, prefix)
        _replay(cached, gm)
        _share_tensors(cached, gm)
    return cached.eval()


def _special_ids(gm: fx.GraphModule) -> dict[str, Any]:
    """End-of-sequence, padding and start ids, as Hugging Face's `generate` reads them (padding falls back
    to the end-of-sequence id)."""
    config, tokenizer = info(gm).config, info(gm).tokenizer
    eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(config, "pad_token_id", None) if pad is None else pad
    pad = eos[0] if pad is None and eos else pad
    return {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": getattr(config, "bos_token_id", None)}


def metadata(gm: fx.GraphModule, layout: CacheLayout) -> dict[str, str]:
    """The cache layout and special ids (`rewrite.runtime.schema.cache_metadata`); the position limit is the plain
    export's."""
    return cache_metadata(layout, _special_ids(gm))


def _decode(sess, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, prompt: int, extra: dict) -> np.ndarray:
    """Generation's steps over known tokens, through the cache generation opens (held in place on a lowered model):
    a prefill of `prompt` tokens (past length 0), then one token per step; the logits of every position,
    `[batch, sequence, vocab]`."""
    cache, position_ids = open_cache(sess, layout, ids.shape[0], ids.shape[1], extra, last_only=False), positions(mask)
    return np.concatenate([cache.run(ids[:, start:end], mask[:, :end], position_ids[:, start:end])
                           for start, end in [(0, prompt), *((t, t + 1) for t in range(prompt, ids.shape[1]))]], 1)


def _reference(gm: fx.GraphModule, layout: CacheLayout, row: np.ndarray, keep: np.ndarray) -> torch.Tensor:
    """`gm`'s logits at a padded row's real tokens, without a cache. A right-padded model numbers positions from
    the mask, as the row alone does; a left-padded one numbers them itself, padding included (as `generate`
    runs it), so the padded row runs."""
    ids, mask = (row[keep], keep[keep]) if layout.padding == "right" else (row, keep)
    ids, mask = torch.from_numpy(ids)[None], torch.from_numpy(mask).long()[None]
    with torch.no_grad():
        logits = pytree.tree_leaves(gm(input_ids=ids, attention_mask=mask))[0][0, -ids.shape[1]:]
    return logits[mask[0].bool()]


def _verify(gm: fx.GraphModule, path: Path, vocab: int, compare: Compare,
            slots: SlotExport | None) -> tuple[float, float, str]:
    """What generation runs, in ONNX Runtime, against `gm` on each row without a cache: a batch of 2 padded on
    the layout's side and a batch of 1, each prefilled and then decoded token by token at batch sizes and past lengths
    the capture never saw (a slotted model fed `gm`'s own adapter through its slots). The layout is the file's,
    as generation reads it (lowering may have dropped `position_ids`)."""
    layout = ModelSchema.read(path).require_cache()
    prompt, steps, pad = 7, 3, 3
    ids = torch.randint(0, vocab, (2, prompt + steps), generator=torch.Generator().manual_seed(1)).numpy()
    mask = np.ones_like(ids)
    mask[0, slice(prompt - pad, prompt) if layout.padding == "right" else slice(0, pad)] = 0
    sess, worst, tolerance = runtime.session(path), 0.0, 0.0
    for rows in (slice(0, 2), slice(1, 2)):
        extra = slots.verify_feeds(rows.stop - rows.start) if slots else {}
        decoded = _decode(sess, layout, ids[rows], mask[rows], prompt, extra)
        for row, keep, logits in zip(ids[rows], mask[rows].astype(bool), decoded):
            diff, tolerance = compare("logits", _reference(gm, layout, row, keep), torch.from_numpy(logits[keep]))
            worst = max(worst, diff)
    return worst, tolerance, sess.get_providers()[0]


def _refuse_prefix_slots(gm: fx.GraphModule) -> None:
    prefixed = sorted(_prefixes(gm))
    if prefixed:
        raise RewriteError(
            f"a KV-cache export cannot take the {prefixed[0]} pass's prompt table as an adapter slot: its virtual "
            "tokens' keys and values are computed from the table at export and stored as the cache's constant "
            "prefix, so another table fed at run time would be ignored; export it with --with-cache alone or "
            "with adapter slots alone"
        )


def signature(gm: fx.GraphModule, slot_options: dict | None = None) -> Signature:
    """The KV-cache export of `gm`: the cached graph, its named inputs and outputs, metadata and verification;
    with `slot_options` (`mixed`, `max_rank`) its adapter slots as extra inputs (`rewrite.export.onnx_adapters`)."""
    if slot_options is not None:
        _refuse_prefix_slots(gm)
    cached = cached_graph(gm)
    layout: CacheLayout = info(cached).cache
    vocab = vocab_size(gm)
    inputs = example_inputs(layout, vocab, **_PROBE)
    input_names = [*[k for k in inputs if k != "past"], *layout.past_names()]
    dynamic, slots = dynamic_shapes(layout, names=True), None
    if slot_options is not None:
        slots = SlotExport(gm, **slot_options, traced=cached, example=inputs)
        cached = slots.graph
        inputs, dynamic = inputs | slots.example_inputs(_PROBE["batch"]), dynamic | slots.dynamic_shapes()
    return Signature(cached, inputs, dynamic, input_names, ["logits", *layout.present_names()], metadata(gm, layout),
                     lambda path, compare: _verify(gm, path, vocab, compare, slots),
                     input_names + (slots.input_names() if slots else []), slots)
