"""Shared timing helpers for the benchmark scripts (imported as ``_timing``: the
scripts run as ``python benchmarks/NAME.py``, so this folder is on sys.path)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync(dev: torch.device) -> None:
    """Wait for queued device work (CUDA) so wall-clock timings are real."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def seconds_per_step(step: Callable[[], None], steps: int, dev: torch.device, warmup: int = 2) -> float:
    """Run ``step`` ``warmup`` times untimed, then ``steps`` times timed; seconds per step."""
    for _ in range(warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return (time.perf_counter() - t0) / steps
