"""Distributed context for torchrun (DDP). Single-process runs use the same
code with ``world_size == 1``; no module-level state: a :class:`DistContext`
is passed around."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of a (globally identical) index permutation. Every rank
        gets the same count (the tail is dropped) so collective calls stay in step."""
        if not self.enabled:
            return index
        n = len(index) // self.world_size * self.world_size
        return index[self.rank : n : self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        lst = [obj]
        dist.broadcast_object_list(lst, src=0)
        return lst[0]


def init_distributed(device_type: str = "cpu") -> DistContext:
    """Initialise the process group from torchrun's environment, if present."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current_context() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()
