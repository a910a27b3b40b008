"""The graph `rewrite.training.train` steps through: a copy of the user's graph rewritten for training speed.

The speed passes run on a twin of the graph that shares its parameters, so the user's graph (its
evaluation, saved archive, fold and export) is untouched; except under FSDP, which shards the user's graph
itself: the passes a sharded graph can take (`shardable`) rewrite it in place first, and the graph as it was is
kept for what the run writes. A pass is a training-speed pass by declaring
`speed = SpeedPass(...)` on its class: whether it applies by default (the exact ones: the loss without
full logits, LoRA A projections fused, `[CLS]`-row classifiers and cheaper CPU dropout masks, both not
when the run keeps Hugging Face's dropout masks bit for bit) or on request (per-block activation
checkpointing), what it needs and must run after, and how it may be used. The pipeline is those
declarations: the chosen passes, what they need, in an order that keeps every constraint.
A pass that is exact only for batches without padding (attention without a materialized mask)
makes a second twin for those; `Graphs` picks one per batch.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import networkx as nx
import torch
from torch import fx, nn

from rewrite.graph.ir import META_KEY, deep_copy, info, wrap
from rewrite.errors import RewriteError
from rewrite.graph.pipeline import Pipeline, Pass, available, pass_class

_COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class SpeedPass:
    """A training-speed pass's place in the pipeline and how it may be used.

    `needs`: passes whose output it rewrites (added to a run that chooses it, and run first); `after`:
    passes that run first when both run; `last`: after every other; `default`: applied unless the run says
    otherwise. Flags: it changes train-mode dropout draws (not bit-exact with Hugging Face's masks), its graph
    returns what the loss must finish (not logits, so a custom loss cannot read it), it is exact only for
    batches without padding, it outlines sub-graphs recomputed in the backward (which may cut across blocks)."""

    default: bool = True
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    last: bool = False
    changes_dropout: bool = False
    replaces_logits: bool = False
    unpadded_only: bool = False
    outlines: bool = False


def speed_of(cls: type[Pass]) -> SpeedPass | None:
    """The pass's speed declaration, or None when it is not a training-speed pass."""
    declared = getattr(cls, "speed", None)
    return declared if isinstance(declared, SpeedPass) else None


def ordered(names: Sequence[str]) -> list[str]:
    """`names` in an order that keeps every pass's `needs`, `after` and `last`; ties by name."""
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for name in names:
        declared = speed_of(pass_class(name))
        before = [n for n in names if n != name] if declared.last else [*declared.needs, *declared.after]
        graph.add_edges_from((first, name) for first in before if first in graph)
    try:
        return list(nx.lexicographical_topological_sort(graph))
    except nx.NetworkXUnfeasible:
        raise RewriteError(f"the training-speed passes {', '.join(names)} declare a cycle in their order") from None


def _compiled(gm: fx.GraphModule | None, compile: bool):
    """`gm` under `torch.compile` with dynamic shapes from the first step: batches of every length run
    the one compiled graph (without, the second length recompiles)."""
    return torch.compile(gm, backend=_COMPILE_BACKEND, dynamic=True) if compile and gm is not None else gm


class Graphs(nn.Module):
    """The training graph, and where exact a variant for batches without padding, sharing parameters."""

    def __init__(self, general: fx.GraphModule, unpadded: fx.GraphModule | None, compile: bool):
        super().__init__()
        self.general = general
        self.unpadded = unpadded
        self._general = _compiled(general, compile)
        self._unpadded = _compiled(unpadded, compile)

    def forward(self, **inputs: torch.Tensor):
        mask = inputs.get("attention_mask")
        padded = self.unpadded is None or mask is None or not bool(mask.all())
        return (self._general if padded else self._unpadded)(**inputs)


def saved_bytes(run: Callable[[], object], module: nn.Module) -> int:
    """What autograd keeps for the backward while `run()` runs: distinct storages, `module`'s parameters
    left out (the measure the lean-activation passes lower; load-independent)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def speed_passes(default: bool = True) -> list[str]:
    """The registered training-speed passes `rewrite.training.train` applies by default (or the opt-in ones), in order."""
    return ordered([name for name in available()
                    if speed_of(pass_class(name)) is not None and speed_of(pass_class(name)).default == default])


def _with_needs(names: Sequence[str]) -> list[str]:
    chosen = list(dict.fromkeys(names))
    for name in chosen:  # grows while it is walked: what a needed pass needs is added too
        chosen += [n for n in speed_of(pass_class(name)).needs if n not in chosen]
    return chosen


def resolve(names: Sequence[str] | None, *, dropout_parity: bool, custom_loss: bool,
            checkpoint: bool = False, sharded: bool = False) -> list[str]:
    """The speed passes a run applies, in order: `names`, or by default every exact one (and the opt-in
    ones with `checkpoint`), less those that would change Hugging Face's dropout masks when
    `dropout_parity` is asked for, and those that leave the head to the built-in loss when the caller
    brings a loss. A `sharded` run (FSDP) takes those that `shardable` allows: by default the others are left
    out, asked for by name they are refused."""
    chosen = list(speed_passes() if names is None else names)
    if not sharded:
        chosen += [name for name in speed_passes(default=False) if checkpoint and name not in chosen]
    for name in chosen:
        if speed_of(pass_class(name)) is None:
            raise RewriteError(f"pass {name!r} is not a training-speed pass; use some of "
                               f"{', '.join(speed_passes() + speed_passes(default=False))}")
    chosen = [name for name in _with_needs(chosen)
              if not (dropout_parity and speed_of(pass_class(name)).changes_dropout)
              and not (custom_loss and speed_of(pass_class(name)).replaces_logits)]
    if sharded:
        refused = [name for name in chosen if not shardable(name)]
        if refused and names is not None:
            allowed = [name for name in speed_passes() if shardable(name)]
            raise RewriteError(f"training-speed pass{'es' if len(refused) > 1 else ''} {', '.join(refused)} cannot "
                               f"run on a graph FSDP shards (--fsdp); use some of {', '.join(allowed)}, or drop --fsdp")
        chosen = [name for name in chosen if shardable(name)]
    return ordered(chosen)


def shardable(name: str) -> bool:
    """Whether the speed pass `name` can rewrite a graph that FSDP then shards in place: FSDP shards one graph, which
    evaluation runs too, so not a pass that needs a second graph (`unpadded_only`) or that leaves the logits to the
    loss; and not one that outlines sub-graphs, which per-block sharding must leave inside the blocks (a norm of one
    block recomputed in the next; activation checkpointing is FSDP's `checkpoint`, per block)."""
    declared = speed_of(pass_class(name))
    return (not declared.replaces_logits and not declared.outlines
            and not any(speed_of(pass_class(n)).unpadded_only for n in (name, *declared.needs)))


def twin(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A train-mode copy of `gm` (same parameters, own metadata) rewritten by the passes `names`."""
    copied = wrap(gm, deep_copy(gm.graph), _own_meta(gm), training=True)
    if names:
        with _quiet(names):
            copied = Pipeline(list(names)).run(copied)
    return copied


def _own_meta(gm: fx.GraphModule):
    """A copy of `gm`'s metadata with its own pass history, which the speed passes append to."""
    return dataclasses.replace(info(gm), history=list(info(gm).history))


def rewrite_in_place(gm: fx.GraphModule, names: Sequence[str]) -> fx.Graph:
    """Rewrites `gm` itself by the speed passes `names` (a sharded run: FSDP shards `gm` in place, so no twin shares
    its parameters); returns its graph as it was, what the run writes, and keeps its metadata as it was."""
    flat, meta = deep_copy(gm.graph), _own_meta(gm)
    if names:
        with _quiet(names):
            rewritten = Pipeline(list(names)).run(gm)
        assert rewritten is gm, "a training-speed pass replaced the graph module instead of rewriting it"
        gm.meta[META_KEY] = meta
    return flat


def graphs(gm: fx.GraphModule, names: Sequence[str], compile: bool = False) -> Graphs:
    """The training graphs for `gm`: the general twin, and the unpadded twin when `dense_attention`
    changes anything."""
    general = twin(gm, [n for n in names if not _unpadded_only(n) and not any(map(_unpadded_only, _needs(n)))])
    unpadded = None
    if any(_unpadded_only(n) for n in names):
        candidate = twin(gm, names)
        if _changed(candidate, since=len(info(gm).history)):
            unpadded = candidate
    return Graphs(general, unpadded, compile)


def _changed(candidate: fx.GraphModule, since: int) -> bool:
    """Whether an unpadded-only pass changed the candidate graph (else the general graph serves all)."""
    return any(_unpadded_only(entry["pass"]) and entry["modified"] for entry in info(candidate).history[since:])


def _unpadded_only(name: str) -> bool:
    return speed_of(pass_class(name)).unpadded_only


def _needs(name: str) -> tuple[str, ...]:
    return speed_of(pass_class(name)).needs


class _quiet:
    """Speed passes are applied wherever they might help: neither their warnings nor their summaries are news. Quiets
    the loggers of the modules that define the passes `names`, and the pipeline's."""

    def __init__(self, names: Sequence[str]):
        self.loggers = [logging.getLogger(module)
                        for module in {Pipeline.__module__, *(pass_class(name).__module__ for name in names)}]

    def __enter__(self):
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
