"""Training-loop throughput against the bare model step.

Measures, in one process and alternating (bare, loop, bare, loop, ...):

- **loop**: ``unbackdoor.training.fit`` — the real pipeline: uint8 data on the
  device, per-epoch seeded batches, batched augmentation (random crop, flip
  where the dataset allows), autocast/memory format, cross-entropy, optimiser
  and per-step LR schedule, loss/accuracy bookkeeping and per-epoch records;
- **bare**: the same architecture's forward + backward + optimiser step on
  pre-made float tensors (same batch size, same precision and memory format
  the loop chose), nothing else;

and reports the medians in images/s, the ratio loop / bare (target >= 0.9)
and the peak memory. Each loop measurement runs ``1 + epochs`` epochs and is
timed from the end of the first (warm-up, like the bare step's warm-up steps)
to the end of the last, with timestamps taken through ``fit``'s per-epoch
``evaluate`` hook. Two clocks: wall time (what a user waits) and process CPU
time (robust when other jobs share the machine; with ``--threads 1`` it is the
exact compute of the one thread). The output also goes to
``docs/bench_throughput.txt`` (``--append`` adds to it).

    .venv/bin/python benchmarks/throughput.py [--model cnn-small] [--batch-size 64] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unbackdoor.data.loaders import load_splits
from unbackdoor.models.registry import create
from unbackdoor.training import fit
from unbackdoor.training.device import Precision, pick_device
from unbackdoor.training.engine import EngineOptions, make_optimizer, set_seed
from unbackdoor.training.fit import TrainConfig


def make_model(name: str, shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> torch.nn.Module:
    set_seed(seed)
    return create(name, num_classes=num_classes, in_channels=shape[0], image_size=shape[1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(model_name: str, train, cfg: TrainConfig, device: torch.device) -> tuple[float, float, str]:
    """(wall images/s, CPU images/s, precision) of ``fit`` over the epochs after the first."""
    stamps: list[tuple[float, float]] = []

    def stamp(_model) -> dict:  # fit calls this at the end of every epoch
        sync(device)
        stamps.append((time.perf_counter(), time.process_time()))
        return {}

    model = make_model(model_name, train.shape, train.num_classes, cfg.seed)
    res = fit(model, train, cfg, evaluate=stamp, desc="bench")
    images = (cfg.epochs - 1) * (len(train) // cfg.batch_size) * cfg.batch_size
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    return images / (w1 - w0), images / (c1 - c0), res.precision


def run_bare(model_name: str, train, cfg: TrainConfig, device: torch.device, prec: Precision) -> tuple[float, float]:
    """(wall images/s, CPU images/s) of forward + backward + optimiser steps on fixed tensors,
    as many steps as the timed part of the loop takes."""
    model = make_model(model_name, train.shape, train.num_classes, cfg.seed).to(device).train()
    x = torch.rand(cfg.batch_size, *train.shape, device=device)
    y = torch.randint(0, train.num_classes, (cfg.batch_size,), device=device)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps = (cfg.epochs - 1) * (len(train) // cfg.batch_size)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with prec.autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up
        step()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    w1, c1 = time.perf_counter(), time.process_time()
    return steps * cfg.batch_size / (w1 - w0), steps * cfg.batch_size / (c1 - c0)


def peak_memory(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = rss / 1024 / (1024 if sys.platform == "darwin" else 1)
    out = f"peak process RSS {rss_mib:.0f} MiB"
    if device.type == "cuda":
        out += f", peak CUDA allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return out


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--root", help="local files for file-based datasets")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per loop measurement (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="(bare, loop) pairs; medians are reported (default 5)")
    ap.add_argument("--precision", default="auto", help="auto (the loop's probe), fp32, bf16, ...(+channels_last)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench_throughput.txt"))
    ap.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    train = load_splits(args.dataset, root=args.root, seed=0).train
    cfg = TrainConfig(epochs=2, batch_size=args.batch_size, seed=0,
                      engine=EngineOptions(device=str(device), precision=args.precision, progress=False))
    # A warm-up run of the real loop; it also settles the precision (auto = measured by
    # the probe), which both measurements then use.
    prec_name = run_loop(args.model, train, cfg, device)[2]
    cfg.engine.precision = prec_name
    cfg.epochs = 1 + args.epochs
    prec = Precision.parse(prec_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bare_w, bare_c, loop_w, loop_c = [], [], [], []
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        w, c = run_bare(args.model, train, cfg, device, prec)
        bare_w.append(w)
        bare_c.append(c)
        w, c, _ = run_loop(args.model, train, cfg, device)
        loop_w.append(w)
        loop_c.append(c)
    load1 = os.getloadavg()[0]

    def ratios(bare: list[float], loop: list[float]) -> str:
        # Each (bare, loop) pair runs back to back under nearly the same machine load, so the
        # median of the per-pair ratios is the steadier figure on a shared machine.
        pair = statistics.median(lv / bv for bv, lv in zip(bare, loop))
        return f"{statistics.median(loop) / statistics.median(bare):.3f} (ratio of medians), {pair:.3f} (median per-pair ratio)"

    steps = len(train) // args.batch_size
    lines = [
        f"unbackdoor training-loop throughput ({time.strftime('%Y-%m-%d %H:%M')})",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}",
        f"setup: {args.model} on {args.dataset} train ({len(train)} images, {train.shape}), batch {args.batch_size}, "
        f"precision {prec_name}; {args.epochs} timed epoch(s) x {steps} steps per measurement; "
        f"{args.repeats} alternating (bare, loop) pairs",
        f"bare step, wall  : median {statistics.median(bare_w):7.0f} img/s   runs {_runs(bare_w)}",
        f"our loop,  wall  : median {statistics.median(loop_w):7.0f} img/s   runs {_runs(loop_w)}",
        f"bare step, CPU   : median {statistics.median(bare_c):7.0f} img/CPU-s   runs {_runs(bare_c)}",
        f"our loop,  CPU   : median {statistics.median(loop_c):7.0f} img/CPU-s   runs {_runs(loop_c)}",
        f"loop / bare, wall: {ratios(bare_w, loop_w)}   (target >= 0.9)",
        f"loop / bare, CPU : {ratios(bare_c, loop_c)}   (target >= 0.9)",
        peak_memory(device),
        f"load average (1 min) at start / end: {load0:.1f} / {load1:.1f} on {os.cpu_count()} CPUs",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.read_text() + "\n" if args.append and out.exists() else ""
        out.write_text(old + text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
