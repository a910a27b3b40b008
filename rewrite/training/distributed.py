"""One process or many: the rank, the device, collectives that are no-ops alone, the model wrapper,
and the trainable state of checkpoints.

Under `torchrun` (WORLD_SIZE > 1 in the environment) `setup` joins the process group (NCCL on
CUDA, gloo on CPU) unless the caller already did; each rank trains on its own GPU (LOCAL_RANK) or
on the CPU. Gradients are averaged by DistributedDataParallel, or, with `shard`, the graph is sharded
in place with FSDP2's `fully_shard`: outlined into one module per transformer block
(`rewrite.graph.blocks`), each block is a unit gathered only while it runs forward or backward, and each of its
projections (with its adapter tensors) a unit nested in it, so a rank holds one projection gathered at a time, not
a whole block; so are the embeddings, final norm and an untied head, and the root (what is left: tied tensors) is
one more. A frozen, untied word embedding and LM head are never gathered: each rank keeps its rows of the table
(`rewrite.training.vocab_parallel`). A graph that cannot be outlined is one unit, gathered whole for every step.
Checkpoints hold each rank's shards of the trainable parameters and the optimizer state (`save_shards`,
`load_shards`: `torch.distributed.checkpoint`, which a single process uses without a process group), and load on
any number of ranks.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import fx, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from rewrite.errors import RewriteError
from rewrite.graph import quantized
from rewrite.graph.blocks import BlockLayout, outline_blocks
from rewrite.graph.ir import owner_of
from rewrite.graph.nodes import drop_dtype_checks
from rewrite.training import vocab_parallel

log = logging.getLogger(__name__)


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over ranks (the tensor itself when alone)."""
        if self.world > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def gather(self, value) -> list:
        """Every rank's picklable `value`, in rank order."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def _available() -> list[str]:
    """The devices this machine can train on, as `--device` spells them."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else []),
            *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]


def _device(requested: str | None, local_rank: int) -> torch.device:
    """The requested device, checked to exist here; by default (or plain `cuda`) this rank's GPU, else the CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise RewriteError(f"device {requested!r} is not a torch device; use cpu, cuda or cuda:N") from error
        if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count():
            return device if device.index is not None else torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.type != "cpu":
            raise RewriteError(f"device {requested!r} is not available on this machine; use {', '.join(_available())}")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(requested_device: str | None = None) -> Context:
    """Joins torchrun's process group if there is one; picks CUDA when available, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), device, owns)
    return Context(0, 1, device, owns)


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """The model to train: `module` itself alone, else DDP around it."""
    if ctx.world == 1:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def shard(gm: fx.GraphModule, ctx: Context, *, checkpoint: bool = False, bf16: bool = False,
          offload: bool = False, flat: fx.Graph | None = None) -> BlockLayout:
    """Shards `gm` in place over all ranks with FSDP2: each projection of a transformer block a unit, each block a unit
    around them (its norms), each edge unit (embeddings, final norm, untied LM head: `rewrite.graph.blocks`), then
    the root; one unit when the graph cannot be outlined per block (logged with the reason). A frozen word embedding
    or LM head edge unit keeps its rows on each rank instead (`layout.vocabulary`), FSDP leaving them alone.
    `checkpoint` recomputes each block's activations in the backward; `bf16` gathers and computes in bf16 and
    reduces gradients in fp32 (the sharded parameters stay as they are); `offload` keeps the shards in CPU memory
    between uses; `flat`: the graph `gm` was before training-speed passes rewrote it (`BlockLayout.flat`, what is
    written). Frozen parameters and every other change to the graph must come before: a sharded graph is recompiled
    by a mode switch only (`rewrite.graph.modes`)."""
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))  # the default mesh would follow the accelerator
    # what loading left in reference cycles (a Hugging Face model's modules) may still hold the full weights: freed
    # first, so each weight's mapping, and the pages this rank read of it, go as FSDP replaces it by its shard
    gc.collect()
    if bf16:
        drop_dtype_checks(gm.graph, torch.float32)  # the capture's fp32 checks would refuse the bf16 weights
        gm.recompile()
    tables = vocab_parallel.vocabulary_tables(gm)
    layout = outline_blocks(gm, checkpointed=checkpoint, flat=flat)
    if layout.refused:
        log.warning("FSDP shards the graph as one unit, gathered whole for every step%s: %s",
                    " and without activation checkpointing" if checkpoint else "", layout.refused)
    rows = _shard_vocabulary(gm, layout, tables, mesh, ctx.device, torch.bfloat16 if bf16 else None)
    layout.packed = _packed_as_parameters(gm)
    offloaded = {"offload_policy": CPUOffloadPolicy()} if offload else {}
    parts = set(layout.parts)
    for path in layout.units:
        # a block's projections take their inputs as the block computed them, as they did unsharded
        fully_shard(gm.get_submodule(path), mesh=mesh, **_precision(bf16, cast_inputs=path not in parts), **offloaded)
    fully_shard(gm, mesh=mesh, ignored_params=rows, **_precision(bf16, cast_inputs=True), **offloaded)
    if ctx.device.type == "cpu":
        # FSDP keeps each unit's all-gather buffer in the forward until the next unit's copy-out, for a CUDA copy
        # stream to overlap; a CPU has none, and the buffer is a second copy of the unit (per-rank peak against
        # one process: 2 ranks 0.69x -> 0.68x, 4 ranks 0.42x -> 0.38x)
        gm._set_unshard_async_op(True)
    return layout


def _precision(bf16: bool, cast_inputs: bool) -> dict[str, MixedPrecisionPolicy]:
    """`fully_shard`'s mixed precision argument: with `bf16`, gathered and run in bf16, gradients reduced in fp32,
    the unit's floating inputs cast to bf16 when `cast_inputs`; none without."""
    if not bf16:
        return {}
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                              cast_forward_inputs=cast_inputs)}


def _shard_vocabulary(gm: fx.GraphModule, layout: BlockLayout, tables: set[str], mesh, device: torch.device,
                      dtype: torch.dtype | None) -> set[nn.Parameter]:
    """Turns each edge unit that is a frozen, untied word embedding or LM head into its vocabulary-parallel twin
    (`rewrite.training.vocab_parallel`), recorded in `layout.vocabulary`; returns their row shards, which FSDP
    must leave alone."""
    rows = set()
    for path in layout.edges:
        unit = gm.get_submodule(path)
        node = vocab_parallel.shardable(unit, path, tables)
        if node is not None:
            rows.add(vocab_parallel.shard_rows(unit, node, mesh, device, dtype))
            layout.vocabulary.append(path)
    return rows


def _packed_as_parameters(gm: fx.GraphModule) -> list[str]:
    """Re-registers every packed weight (a quantized base's buffers) as a frozen parameter of its module, so FSDP
    shards it like any weight instead of copying it to every rank; their names."""
    names = quantized.packed_buffers(gm)
    for name in names:
        module, leaf = owner_of(gm, name)
        tensor = getattr(module, leaf)
        delattr(module, leaf)
        module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return names


def units(module: nn.Module) -> list[FSDPModule]:
    """The FSDP units in `module`, the root first."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool):
    """Skips the gradient reduction for all but the last micro-batch of an accumulation window."""
    if skip and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif skip and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def scalar(value: torch.Tensor) -> float:
    """A (possibly sharded) scalar as a float, e.g. the gradient norm FSDP returns as a DTensor."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


_SHARDS = StateDictOptions(ignore_frozen_params=True)
_SHARDS_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not in a checkpoint


def _shards(module: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict:
    """This rank's shards of the parameters `names` and of the optimizer state, keyed by parameter name.
    Frozen parameters are dropped by name: `ignore_frozen_params` keeps tied aliases (GPT-2's
    `lm_head.weight`) and buffers. A fresh optimizer's state is created here (it must hold no gradients),
    so a load has tensors to fill."""
    model, optim = get_state_dict(module, optimizer, options=_SHARDS)
    return {"model": {name: model[name] for name in names}, "optim": optim}


@contextlib.contextmanager
def _without_group_warning():
    """A single process has no process group, which `torch.distributed.checkpoint` warns about each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_shards(module: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str], directory: Path) -> None:
    """Every rank writes its shards of the trainable parameters `names` and of the optimizer state into
    `directory` (a collective: the same directory on every rank); `.metadata` is written last."""
    with _without_group_warning():
        dcp.save(_shards(module, optimizer, names), checkpoint_id=directory)


def load_shards(module: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str], directory: Path) -> None:
    """Loads what `save_shards` wrote, on any number of ranks: each reads the parts of its own shards."""
    state = _shards(module, optimizer, names)
    with _without_group_warning():
        dcp.load(state, checkpoint_id=directory)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_SHARDS_LOAD)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a sharded `module` gathered whole into rank 0's CPU memory, one tensor at a
    time (a collective: the other ranks get nothing and never hold more than one whole tensor)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies full tensors into the (possibly sharded) parameters they name; every rank passes them all
    (checkpoints written before they were sharded)."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
