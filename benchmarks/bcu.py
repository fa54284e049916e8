"""BCU distillation throughput: how close :func:`unbackdoor.defenses.bcu.distill` runs
to the bare compute it cannot avoid.

    .venv/bin/python benchmarks/bcu.py [--model cnn-small|resnet18] [--precision auto] [--device auto]

Prints, in one run:
- distillation images/s over whole epochs (indexing the uint8 images, crop(+flip)
  augmentation, teacher forward, student forward/backward, KL loss, SGD step,
  cosine schedule, progress bookkeeping) on mnist5k's 500 held-out images
  (cnn-small) or 512 random 32x32 images (resnet18);
- the bare teacher forward (no grad) + student forward/backward on pre-made
  tensors of the same batch size and layout (no optimizer step);
- their ratio (target >= 0.85) and peak memory (max RSS; CUDA: max allocated).

Distillation and bare runs alternate for ``--rounds`` rounds and the medians are
compared, so a load change on a shared machine biases neither side.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys

import torch
from _timing import seconds_per_step

from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.loaders import load_splits
from unbackdoor.defenses.bcu.distill import BCUConfig, distill, kd_loss, reinitialize
from unbackdoor.defenses.bcu.schedule import layer_schedule
from unbackdoor.models.registry import create
from unbackdoor.training.device import pick_device, resolve_precision
from unbackdoor.training.engine import EngineOptions


def bare(teacher, student, x: torch.Tensor, steps: int, prec, dev) -> float:
    """Images/s of teacher forward + student forward/backward on a pre-made batch."""
    student.train()

    def step() -> None:
        with prec.autocast(dev):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
        kd_loss(s, t, 2.0).backward()
        student.zero_grad(set_to_none=True)

    return len(x) / seconds_per_step(step, steps, dev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn-small", choices=["cnn-small", "resnet18"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=0, help="distillation epochs per round (default: model-dependent)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    if args.model == "cnn-small":
        data = load_splits("mnist5k", seed=0).heldout
        epochs = args.epochs or 6
    else:
        g = torch.Generator().manual_seed(0)
        data = ImageDataset(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g),
                            torch.zeros(512, dtype=torch.long), ["x"], meta={"flip": True})
        epochs = args.epochs or 1
    c, h, _ = data.shape
    teacher = create(args.model, num_classes=10, in_channels=c, image_size=h).to(dev).eval()
    prec = resolve_precision(args.precision, teacher, data.shape, dev, args.batch_size)
    cfg = BCUConfig(epochs=epochs, batch_size=args.batch_size, eval_every=10**6,
                    engine=EngineOptions(device=str(dev), precision=prec.name, progress=False))

    student = reinitialize(teacher, layer_schedule(teacher, cfg), seed=0).to(dev)
    t_bare, s_bare = teacher, student
    if prec.channels_last:
        t_bare = teacher.to(memory_format=torch.channels_last)
        s_bare = student.to(memory_format=torch.channels_last)
    x = torch.rand(args.batch_size, *data.shape, device=dev)
    if prec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps = max(3, len(data) * epochs // args.batch_size)

    print(f"model {args.model}  device {dev}  precision {prec.name}  batch {args.batch_size}  "
          f"threads {torch.get_num_threads()}  unlabeled {len(data)} x {tuple(data.shape)}  "
          f"cpus {os.cpu_count()}  load {os.getloadavg()[0]:.1f}", flush=True)
    dist_ips, bare_ips = [], []
    bare_ips.append(bare(t_bare, s_bare, x, steps, prec, dev))
    for r in range(args.rounds):
        st = reinitialize(teacher, layer_schedule(teacher, cfg), seed=r)
        res = distill(teacher, st, data, cfg)
        # whole epochs, as the loop runs them (images / seconds per epoch)
        dist_ips.append(statistics.fmean(h["images_per_second"] for h in res.history))
        bare_ips.append(bare(t_bare, s_bare, x, steps, prec, dev))
        print(f"round {r + 1}: distill {dist_ips[-1]:8.0f} img/s   bare {bare_ips[-2]:8.0f} -> {bare_ips[-1]:8.0f} img/s",
              flush=True)
    # bare runs bracket each distillation round; compare each round with its two neighbours
    ratios = [d / ((bare_ips[i] + bare_ips[i + 1]) / 2) for i, d in enumerate(dist_ips)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"distillation      {statistics.median(dist_ips):8.0f} img/s (median of {len(dist_ips)})")
    print(f"bare fwd+fwd/bwd  {statistics.median(bare_ips):8.0f} img/s (median of {len(bare_ips)})")
    ratio = statistics.median(ratios)
    print(f"ratio             {ratio:8.3f}  (target >= 0.85; per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"peak memory       {peak:8.0f} MiB max RSS" +
          (f", {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB CUDA" if dev.type == "cuda" else ""))
    return 0 if ratio >= 0.85 else 1


if __name__ == "__main__":
    sys.exit(main())
