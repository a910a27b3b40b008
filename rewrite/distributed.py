"""One process or many: the rank, the device, collectives that are no-ops alone, and the model wrapper.

Under `torchrun` (WORLD_SIZE > 1 in the environment) `setup` joins the process group (NCCL on
CUDA, gloo on CPU) unless the caller already did; each rank trains on its own GPU (LOCAL_RANK) or
on the CPU. Gradients are averaged by DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rewrite.errors import RewriteError


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


def _device(requested: str | None, local_rank: int) -> torch.device:
    if requested:
        try:
            return torch.device(requested)
        except RuntimeError as error:
            raise RewriteError(f"device {requested!r} is not a torch device; use cpu, cuda or cuda:N") from error
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
    """DistributedDataParallel over the trainable parameters when there are several ranks."""
    if ctx.world == 1:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def no_sync(model: nn.Module, skip: bool):
    """Skips the gradient all-reduce for all but the last micro-batch of an accumulation window."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
