"""Does DBD's and BCU's cost grow linearly with the data? Seconds per training image
at 5k, 15k and 60k Fashion-MNIST images (the real 60,000 training images, or
subsets of them), and peak memory, in one run.

    .venv/bin/python benchmarks/size.py [--sizes 5000,15000,60000] [--precision auto]

Every stage runs the same work per image at every size, so a linear implementation
prints the same seconds per image three times:
- DBD: one SimCLR epoch, one head epoch (with the guard's per-epoch split), and
  one MixMatch epoch of ``n / 64`` steps (one pass over the data) with its split;
- BCU: one distillation epoch over a pool of ``n`` unlabeled images.
Each size runs in a fresh process (so its peak RSS is its own); the sizes
alternate with each other ``--rounds`` times and the medians are compared.
The last line prints the largest / smallest seconds-per-image ratio per method
(target <= 1.2).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace


def one(n: int, precision: str, device: str) -> dict:
    import resource

    import torch

    from unbackdoor.data.idx import fashion_mnist_root, load_idx_split, subset_per_class
    from unbackdoor.defenses.bcu.config import bcu_preset
    from unbackdoor.defenses.bcu.distill import distill, reinitialize
    from unbackdoor.defenses.bcu.schedule import layer_schedule
    from unbackdoor.defenses.dbd.config import dbd_preset
    from unbackdoor.defenses.dbd.stages import linear_stage, mixmatch_stage, polish_stage, simclr_stage
    from unbackdoor.models.registry import create
    from unbackdoor.training.device import pick_device, resolve_precision, tune_cpu_allocator
    from unbackdoor.training.engine import EngineOptions

    tune_cpu_allocator()
    full = load_idx_split(fashion_mnist_root(None), "train")
    ds = full if n >= len(full) else subset_per_class(full, n // full.num_classes, seed=0)
    ds.meta["flip"] = False
    torch.manual_seed(0)
    model = create("cnn-small", 10, 1, 28)
    dev = pick_device(device)
    prec = resolve_precision(precision, model, ds.shape, dev, 256).name
    eng = EngineOptions(device=device, precision=prec, progress=False)
    cfg = dbd_preset("quick")
    out = {"n": len(ds), "precision": prec}
    t = time.perf_counter()
    simclr_stage(model, ds, replace(cfg.simclr, epochs=1), engine=eng)
    out["simclr"] = time.perf_counter() - t
    t = time.perf_counter()
    linear_stage(model, ds, replace(cfg.linear, epochs=1), engine=eng)
    out["linear"] = time.perf_counter() - t
    t = time.perf_counter()
    mm = replace(cfg.mixmatch, epochs=1, budget="fixed", iterations=max(1, len(ds) // cfg.mixmatch.batch_size))
    mixmatch_stage(model, ds, mm, engine=eng)
    out["mixmatch"] = time.perf_counter() - t
    t = time.perf_counter()
    polish_stage(model, ds, replace(cfg.polish, epochs=1), engine=eng)
    out["polish"] = time.perf_counter() - t
    out["dbd"] = out["simclr"] + out["linear"] + out["mixmatch"] + out["polish"]
    bcfg = bcu_preset("quick")
    bcfg = replace(bcfg, steps=None, epochs=1, engine=eng)
    teacher = model.eval()
    student = reinitialize(teacher, layer_schedule(teacher, bcfg), seed=0)
    t = time.perf_counter()
    distill(teacher, student, ds, bcfg)
    out["bcu"] = time.perf_counter() - t
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


COLUMNS = ("simclr", "linear", "mixmatch", "polish", "dbd", "bcu")  # the table's per-image seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,15000,60000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.precision, args.device)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        for n in sizes:
            res = subprocess.run([sys.executable, __file__, "--one", str(n), "--precision", args.precision,
                                  "--device", args.device], capture_output=True, text=True, check=True)
            runs[n].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {n} images done", file=sys.stderr, flush=True)
    print(f"precision: {runs[sizes[0]][0]['precision']}; medians of {args.rounds} rounds; "
          "microseconds per training image (one epoch / pass of each stage)")
    print("| images | SimCLR | head | MixMatch | polish | DBD | BCU | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    per = {}
    for n in sizes:
        m = {k: statistics.median(r[k] for r in runs[n]) for k in COLUMNS}
        count = runs[n][0]["n"]
        per[n] = {k: v / count for k, v in m.items()}
        rss = max(r["peak_rss_mib"] for r in runs[n])
        print(f"| {count:,} | " + " | ".join(f"{1e6 * per[n][k]:.0f}" for k in COLUMNS)
              + f" | {rss:.0f} MiB |")
    for k in ("dbd", "bcu"):
        vals = [per[n][k] for n in sizes]
        print(f"{k.upper()}: largest / smallest seconds per image = {max(vals) / min(vals):.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
