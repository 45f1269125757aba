"""This process's place in a torchrun job: one process alone, or one per GPU under DDP."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# Rank 0 validates and writes while the other ranks wait at a barrier: allow for a large validation set.
DIST_TIMEOUT = timedelta(minutes=60)


@dataclass
class Distributed:
    """This process's place in a torchrun job (world size 1 when run alone) and the device it drives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value: object) -> list:
        """Every process's `value`, in rank order (alone: `[value]`): the per-image terms of an
        evaluation split across the processes (vitprune.evaluation)."""
        if self.world_size <= 1:
            return [value]
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def all_finite(self, value: float) -> bool:
        """Whether `value` is finite on every process (alone: here), so that all ranks stop together."""
        finite = math.isfinite(value)
        if self.world_size <= 1:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() == 0.0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` itself alone, its DDP wrapper (gradients averaged across ranks) in a job."""
        if self.world_size <= 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def init_distributed(device: str) -> Distributed:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), else run alone.
    Each process drives the GPU of its LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    target = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if cuda:
        torch.cuda.set_device(target)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
        initialized_here = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here, target)


@contextmanager
def distributed_job(device: str) -> Iterator[Distributed]:
    """`init_distributed`, and the process group torn down again if this process made it."""
    job = init_distributed(device)
    try:
        yield job
    finally:
        if job.initialized_here:
            dist.destroy_process_group()
