"""BCU with out-of-distribution unlabeled images, on real data: the attacked models of
one sweep cleansed with another dataset's images as the pool (Fashion-MNIST for the
MNIST models, MNIST for the Fashion-MNIST ones), at two pool sizes, beside BCU with
the sweep's own in-distribution pool (its 500 clean held-out images).

    .venv/bin/python benchmarks/bcu_ood.py --runs runs/sweep --pool fashion-mnist5k --out runs/ood-mnist
    .venv/bin/python benchmarks/bcu_ood.py --runs runs/sweep-fm5k --pool mnist5k --out runs/ood-fm5k

Pools: the other dataset's 500 held-out images (50 a class) and all 5,000 of its
images; labels are dropped. Every run is a real ``unbackdoor bcu --preset quick``
(the same 4,800 optimiser steps whatever the pool's size). A finished run is reused
unless ``--force``. Prints a Markdown table of BA / ASR.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unbackdoor.cli.main import main as cli
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.loaders import load_splits


def pools(dataset: str, out: Path) -> dict[str, Path]:
    s = load_splits(dataset, seed=0)
    everything = ImageDataset(torch.cat([s.train.images, s.test.images, s.heldout.images]),
                              torch.cat([s.train.labels, s.test.labels, s.heldout.labels]), s.train.classes)
    paths = {}
    for name, ds in ((f"{len(s.heldout)}", s.heldout), (f"{len(everything)}", everything)):
        p = out / f"pool_{dataset}_{name}.npz"
        if not p.is_file():
            ds.save_npz(p)
        paths[name] = p
    return paths


def _ba_asr(metrics_file: Path) -> str:
    if not metrics_file.is_file():
        return "—"
    m = json.loads(metrics_file.read_text())
    a = m.get("after", m.get("after_stage3", m))
    return f"{a['clean_accuracy']:.3f} / {a['attack_success_rate']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="a sweep folder: <attack>/data and <attack>/undefended")
    ap.add_argument("--pool", required=True, help="dataset whose images form the out-of-distribution pool")
    ap.add_argument("--out", required=True)
    ap.add_argument("--attacks", default="badnets,blended,wanet,sig")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ps = pools(args.pool, out)
    rows = []
    for attack in args.attacks.split(","):
        src = Path(args.runs) / attack
        row = [attack, _ba_asr(src / "undefended" / "metrics.json"), _ba_asr(src / "bcu" / "metrics.json")]
        for size, pool in ps.items():
            run = out / f"{attack}_{args.pool}_{size}"
            if args.force or not (run / "metrics.json").is_file():
                rc = cli(["bcu", "--model", str(src / "undefended"), "--unlabeled", str(pool), "--data", str(src / "data"),
                          "--out", str(run), "--preset", "quick", "--force", "--no-progress"])
                if rc:
                    raise SystemExit(f"bcu failed for {run}")
            row.append(_ba_asr(run / "metrics.json"))
        rows.append(row)
    sizes = list(ps)
    print("| attack | undefended | BCU, in-distribution pool (500) | " +
          " | ".join(f"BCU, {args.pool} pool ({int(s):,})" for s in sizes) + " |")
    print("|---" * (3 + len(sizes)) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
