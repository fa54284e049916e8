"""Device, precision and memory-format choice.

CPUs differ: bf16 autocast is much slower than fp32 on a CPU without bf16
instructions and much faster on one with them, and channels_last helps or not
by CPU (docs/results_dbd.md has the measurements). So on CPU ``auto`` *measures* a few training steps
of each candidate on the real model and batch shape and keeps the fastest;
the result is cached per (CPU, torch, model, shape) in
``~/.cache/unbackdoor/probe.json`` (``UNBACKDOOR_CACHE`` overrides the folder).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU. Anything else is passed to ``torch.device``."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if "LOCAL_RANK" in os.environ else 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UnbackdoorError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnbackdoorError(f"device {spec!r} requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UnbackdoorError(f"device {spec!r} requested but MPS is not available")
    return dev


@dataclass(frozen=True)
class Precision:
    """What the loop runs in: autocast dtype (None = fp32) and memory format."""

    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        d = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{d}{'+channels_last' if self.channels_last else ''}"

    @classmethod
    def parse(cls, name: str) -> "Precision":
        base, _, fmt = name.partition("+")
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(base, "bad")
        if dtype == "bad":
            raise UnbackdoorError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
        return cls(dtype, fmt == "channels_last")

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def needs_scaler(self, device: torch.device) -> bool:
        return self.dtype == torch.float16 and device.type == "cuda"


def tune_cpu_allocator() -> bool:
    """Keep glibc's allocator from handing large freed blocks back to the OS.

    A CPU training step allocates and frees the same multi-MB activation and
    augmentation buffers every step. With glibc's defaults many of them go back to
    the kernel (``mmap``/trim) and are page-faulted in again on the next step.
    Raising the mmap threshold to its 32 MiB maximum and the trim threshold to
    2 GiB keeps them in the heap: on mnist5k / cnn-small SimCLR ran faster and
    MixMatch unchanged. Freed memory is kept by the process instead of returned,
    so peak RSS can be higher (evidence for both: docs/results_dbd.md, Benchmark,
    2026-12-01).

    Called by the CLI and benchmarks/dbd.py. Linux/glibc only (a no-op elsewhere); set
    ``UNBACKDOOR_MALLOC_TUNING=0`` to leave the allocator alone. Returns whether
    the settings were applied.
    """
    if os.environ.get("UNBACKDOOR_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # both together: a trim threshold alone freezes the mmap threshold at 128 KiB (far more faults)
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _cache_file() -> Path:
    root = os.environ.get("UNBACKDOOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unbackdoor")
    return Path(root) / "probe.json"


def _cpu_id() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") or line.startswith("flags"):
                    name += line
    except OSError:
        pass
    return hashlib.sha1(name.encode()).hexdigest()[:12]


def _read_cache(path: Path) -> dict:
    """The probe cache as a dict; a missing, unreadable or damaged file is an empty cache
    (it is only a cache: the next probe rewrites it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _busy() -> bool:
    """Whether the CPU was busy with other work: 1-minute load average above 3/4 of the
    cores this process may use plus one (our own run); False where unknown."""
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return os.getloadavg()[0] > 0.75 * cores + 1
    except (OSError, AttributeError):
        return False


def probe_precision(model: nn.Module, sample_shape: tuple[int, ...], device: torch.device, batch_size: int = 64,
                    steps: int = 3, candidates: list[str] | None = None) -> Precision:
    """Time ``steps`` forward/backward passes per candidate and return the fastest.

    CUDA: bf16 where supported else fp16, channels_last (no probe needed).
    CPU: fp32 NCHW vs fp32 channels_last vs bf16 channels_last, measured.
    MPS: fp32.
    """
    if device.type == "cuda":
        return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, True)
    if device.type != "cpu":
        return Precision(None, False)
    arch = getattr(model, "arch", {}).get("name", type(model).__name__)
    key = f"{_cpu_id()}|{torch.__version__}|{arch}|{tuple(sample_shape)}|{batch_size}|{torch.get_num_threads()}"
    cache = _cache_file()
    cached = _read_cache(cache).get(key)
    if isinstance(cached, str):
        try:
            return Precision.parse(cached)
        except UnbackdoorError:
            pass  # a damaged entry: measure again and overwrite it
    import copy

    candidates = candidates or ["fp32", "fp32+channels_last", "bf16+channels_last"]
    x = torch.rand(batch_size, *sample_shape, device=device)
    timings = {}
    for name in candidates:
        prec = Precision.parse(name)
        m = copy.deepcopy(model).to(device).train()
        xi = x.contiguous(memory_format=torch.channels_last) if prec.channels_last else x
        if prec.channels_last:
            m = m.to(memory_format=torch.channels_last)
        best = float("inf")
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with prec.autocast(device):
                out = m(xi)
            out.float().sum().backward()
            if i:
                best = min(best, time.perf_counter() - t0)
            # A candidate 3x slower than the best so far is hopeless: stop early (bf16 without hardware support).
            if i and timings and best > 3 * min(timings.values()):
                break
        timings[name] = best
    choice = min(timings, key=timings.get)
    if _busy():
        # Timed while other work shared the CPU: good enough for this run, not worth keeping
        # (a probe cached under load once pinned DBD to a much slower fp32 NCHW:
        # docs/results_dbd.md, Results). The next run probes again.
        return Precision.parse(choice)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(cache)
        data[key] = choice
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, cache)
    except (OSError, ValueError):
        pass
    return Precision.parse(choice)


def resolve_precision(name: str, model: nn.Module, sample_shape: tuple[int, ...], device: torch.device,
                      batch_size: int = 64) -> Precision:
    """``auto`` probes (see :func:`probe_precision`); otherwise parse the name
    (``fp32``, ``bf16``, ``fp16``, optionally ``+channels_last``)."""
    if name == "auto":
        return probe_precision(model, sample_shape, device, batch_size=min(batch_size, 128))
    prec = Precision.parse(name)
    if prec.dtype == torch.float16 and device.type == "cpu":
        raise UnbackdoorError("fp16 autocast is for CUDA; on CPU use fp32 or bf16")
    if "+" not in name and device.type == "cuda":
        prec = Precision(prec.dtype, True)
    return prec
