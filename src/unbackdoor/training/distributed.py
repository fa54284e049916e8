"""Distributed context for torchrun (DDP). Single-process runs use the same
code with ``world_size == 1``; no module-level state: a :class:`DistContext`
is passed around."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unbackdoor.core.errors import UnbackdoorError


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


# ---------------------------------------------------------------------------- collectives
# Every helper below is a collective when ``ctx.enabled``: all ranks must call it, in
# the same order. With one process each is the identity (or a plain call).

def shard_indices(n: int, ctx: DistContext, device: torch.device | str | None = None) -> torch.Tensor:
    """This rank's strided share ``arange(n)[rank::world]`` of ``n`` samples (all of them
    on one process). Ranks may differ by one element; :func:`gather_sharded` undoes it."""
    return torch.arange(ctx.rank, n, ctx.world_size, device=device)


def all_gather_cat(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate (dim 0, rank order) a tensor of the same shape from every rank. No gradient."""
    if not ctx.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_sharded(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Reassemble per-sample values computed on :func:`shard_indices` (``local[j]`` is
    sample ``j * world + rank``) into the full (n, ...) tensor, identical on every rank."""
    if not ctx.enabled:
        return local
    m = -(-n // ctx.world_size)  # ceil: the largest share; shorter ones are padded at the end
    pad = local.new_zeros((m - len(local), *local.shape[1:]))
    full = all_gather_cat(torch.cat([local, pad]), ctx)  # (world * m, ...), rank-major
    # rank-major (r, j) -> sample j * world + r: transpose to (j, r); padding lands past n
    return full.view(ctx.world_size, m, *local.shape[1:]).transpose(0, 1).reshape(-1, *local.shape[1:])[:n]


def all_gather_with_grad(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """:func:`all_gather_cat` that keeps autograd: the gradient reaching each gathered
    block is summed over ranks and sent back to the rank it came from
    (``torch.distributed.nn.functional.all_gather``)."""
    if not ctx.enabled:
        return t
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in recent torch, but its replacement is not autograd-aware on gloo
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(t.contiguous())
    return torch.cat(parts)


def broadcast_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts
    them at the start of each forward, but the last training forward of an epoch then
    updates each rank's copy with its own shard: eval-mode passes would differ by rank."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def run_on_main(ctx: DistContext, fn):
    """Call ``fn()`` on rank 0 only and return its result on every rank (it must be
    picklable). An :class:`~unbackdoor.errors.UnbackdoorError` raised there is raised on
    every rank, so a refused output folder stops all ranks instead of leaving the others
    waiting in a collective."""
    if not ctx.enabled:
        return fn()
    msg = None
    res = None
    if ctx.is_main:
        try:
            res = fn()
        except UnbackdoorError as e:
            msg = str(e)
    res, msg = ctx.broadcast_object((res, msg))
    if msg is not None:
        raise UnbackdoorError(msg)
    return res
