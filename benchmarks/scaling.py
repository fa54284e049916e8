"""Scaling under torchrun: measured images/s of ``unbackdoor train`` with
1 and 2 processes on this machine, and the per-step communication volume of every
distributed stage on paper for W GPUs.

    .venv/bin/python benchmarks/scaling.py [--epochs 1] [--world 8] [--skip-measure]

Measured: ``train`` on mnist5k / cnn-small, fp32, OMP_NUM_THREADS = cores / processes (or --threads),
images/s as the training loop reports it (history.json, all ranks together). Results
and the discussion are in benchmarks/scaling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def count_params(name: str, in_ch: int, size: int, classes: int = 10) -> dict:
    from unbackdoor.models.model_dir import last_linear
    from unbackdoor.models.registry import create

    m = create(name, num_classes=classes, in_channels=in_ch, image_size=size)
    total = sum(p.numel() for p in m.parameters())
    _, fc = last_linear(m)
    d = fc.in_features
    head = sum(p.numel() for p in fc.parameters())
    proj = d * d + d + 2 * d + d * 128 + 128  # SimCLR projector Linear(d,d)-BN(d)-Linear(d,128)
    bn = sum(b.numel() for n, b in m.named_buffers() if "running" in n)
    return {"model": name, "params": total, "feature_dim": d, "head": head,
            "simclr_trainable": total - head + proj, "bn_stats": bn}


def comm_table(world: int) -> list[dict]:
    ring = 2 * (world - 1) / world  # ring all-reduce: each rank sends and receives this many times the buffer
    rows = []
    for name, c, s in (("cnn-small", 1, 28), ("resnet18", 3, 32)):
        p = count_params(name, c, s)
        rows.append({**p,
                     "ddp_allreduce_bytes": ring * 4 * p["params"],  # supervised / BCU / MixMatch step
                     "simclr_allreduce_bytes": ring * 4 * p["simclr_trainable"],
                     "linear_allreduce_bytes": ring * 4 * p["head"]})
    return rows


def measure(nproc: int, epochs: int, data: Path, tmp: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, (os.cpu_count() or 1) // nproc)),
               UNBACKDOOR_CACHE=str(tmp / "cache"))
    out = tmp / f"train{nproc}"
    args = ["train", "--data", str(data), "--epochs", str(epochs), "--precision", "fp32", "--no-progress",
            "--json", "--out", str(out), "--force"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "unbackdoor", *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-port", "29591", "-m", "unbackdoor", *args]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    hist = json.loads((out / "history.json").read_text())
    return max(h["images_per_second"] for h in hist)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: cores / processes)")
    a = ap.parse_args()
    for r in comm_table(a.world):
        print(json.dumps({k: (round(v) if isinstance(v, float) else v) for k, v in r.items()}))
    if a.skip_measure:
        return
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "unbackdoor", "poison", "--dataset", "mnist5k", "--attack", "badnets",
                        "--out", str(data)], check=True, capture_output=True,
                       env=dict(os.environ, UNBACKDOOR_CACHE=str(tmp / "cache")))
        for n in (1, 2):
            print(json.dumps({"train_processes": n, "images_per_second": round(measure(n, a.epochs, data, tmp, a.threads), 1),
                              "threads_per_process": a.threads or max(1, (os.cpu_count() or 1) // n)}))


if __name__ == "__main__":
    main()
