"""The shared training machinery every stage uses (supervised training, SimCLR,
the SCE head, MixMatch, BCU distillation): device placement, precision and
memory format, optimiser + cosine schedule, deterministic per-epoch batches,
DDP wrapping, and atomic checkpoints with resume.

Determinism: the random stream of epoch ``e`` comes from a generator seeded
with ``(seed, e)``, so a run resumed from the checkpoint of epoch ``e - 1``
draws exactly the batches and augmentations an uninterrupted run draws.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.training.checkpoint import load_checkpoint, save_checkpoint
from unbackdoor.training.device import Precision, pick_device, resolve_precision
from unbackdoor.training.distributed import DistContext, current_context

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant", "drop")


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise UnbackdoorError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def make_scheduler(opt: torch.optim.Optimizer, name: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: cosine from the base lr to 0 over ``total_steps``, constant, or ``drop``."""
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps))))
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if name == "drop":  # NAD's authors: the base lr for the first tenth of training, then a tenth of it
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 0.1 * total_steps else 0.1)
    raise UnbackdoorError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def set_seed(seed: int) -> None:
    """Seed torch's global generators (model initialisation)."""
    torch.manual_seed(seed)


@dataclass
class EngineOptions:
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16, optionally +channels_last
    sync_bn: bool = False  # DDP only: convert BatchNorm to SyncBatchNorm
    compile: bool = False  # torch.compile the model (helps on CUDA, rarely on CPU)
    progress: bool = True


class Engine:
    """Owns the model on its device and everything needed to step and checkpoint it."""

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...], opts: EngineOptions | None = None,
                 seed: int = 0, batch_size: int = 128, dist: DistContext | None = None, precision: Precision | None = None):
        self.opts = opts or EngineOptions()
        self.dist = dist or current_context()
        self.device = pick_device(self.opts.device)
        self.seed = seed
        self.model = model.to(self.device)
        self.precision = precision or resolve_precision(self.opts.precision, model, sample_shape, self.device, batch_size)
        if self.dist.enabled:  # ranks must agree: a per-rank probe could pick differently
            self.precision = Precision.parse(self.dist.broadcast_object(self.precision.name))
        if self.precision.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            if self.opts.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.opts.compile:
            self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_scaler(self.device) else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # ------------------------------------------------------------------ set-up
    def set_optimizer(self, params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                      schedule: str = "cosine", total_steps: int = 1) -> None:
        self.optimizer = make_optimizer(params, name, lr, momentum, weight_decay)
        self.scheduler = make_scheduler(self.optimizer, schedule, total_steps)

    def autocast(self):
        return self.precision.autocast(self.device)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """Move a float batch to the device in the chosen memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.precision.channels_last and x.ndim == 4 else x

    def generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        """The random stream of one epoch (and sub-stream), identical across resumes and ranks."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1))
        return g

    def batches(self, n: int, batch_size: int, gen: torch.Generator, drop_last: bool = True, shuffle: bool = True) -> Iterator[torch.Tensor]:
        """Index batches over ``n`` samples for this rank. ``batch_size`` is global:
        each of W ranks takes ``batch_size // W`` of every global batch."""
        perm = torch.randperm(n, generator=gen, device=self.device) if shuffle else torch.arange(n, device=self.device)
        local = max(1, batch_size // self.dist.world_size)
        stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
        for i in range(0, stop, batch_size):
            chunk = perm[i : i + batch_size]
            if self.dist.enabled:
                chunk = self.dist.shard(chunk)
            if len(chunk):
                yield chunk[:local] if self.dist.enabled else chunk

    # ------------------------------------------------------------------ step
    def step(self, loss: torch.Tensor, before_update: Callable[[], None] | None = None) -> None:
        """Backward ``loss`` and take one optimiser (and scheduler) step; ``before_update`` runs
        between the backward and the update (SAM puts the weights back there)."""
        assert self.optimizer is not None, "call set_optimizer first"
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if before_update is not None:
                before_update()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if before_update is not None:
                before_update()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def state(self, **extra: Any) -> dict[str, Any]:
        st = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "precision": self.precision.name,
            "seed": self.seed,
            **extra,
        }
        if self.optimizer is not None:
            st["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            st["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            st["scaler"] = self.scaler.state_dict()
        return st

    def save(self, path: str | os.PathLike | None, **extra: Any) -> None:
        """Write a checkpoint (rank 0 only; other ranks wait)."""
        if path is None:
            return
        if self.dist.is_main:
            save_checkpoint(path, self.state(**extra))
        self.dist.barrier()

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        st = load_checkpoint(path)
        try:
            self.model.load_state_dict(st["model"])
        except (RuntimeError, KeyError) as e:
            raise UnbackdoorError(f"checkpoint {path} does not match the model: {str(e).splitlines()[0]}") from None
        if self.optimizer is not None and "optimizer" in st:
            self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and "scheduler" in st:
            self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler is not None and "scaler" in st:
            self.scaler.load_state_dict(st["scaler"])
        return st


def checkpoint_precision(path: str | os.PathLike) -> Precision | None:
    """The precision a checkpointed run used, so a resumed run keeps it."""
    p = Path(path)
    if not p.exists():
        return None
    return Precision.parse(load_checkpoint(p).get("precision", "fp32"))
