"""DBD acceptance table on mnist5k: for each attack and seed, the undefended model
beside DBD (quick preset) after stage 2 and after stage 3, the poisoned-sample
detection of the final split, and the stage times.

    .venv/bin/python benchmarks/attacks_table.py --out runs/attacks     # data + attacked models
    .venv/bin/python benchmarks/dbd_table.py --runs runs/attacks --out runs/dbd --seeds 0,1

Every run is a real ``unbackdoor dbd`` CLI run (in-process); a finished run
(``metrics.json`` present) is reused, so the table can be rebuilt for free.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from unbackdoor.cli.main import main as cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/attacks", help="benchmarks/attacks_table.py's output folder")
    ap.add_argument("--out", default="runs/dbd")
    ap.add_argument("--attacks", default="badnets,blended,wanet,sig")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--preset", default="quick")
    args = ap.parse_args()
    rows = []
    for attack in args.attacks.split(","):
        data = Path(args.runs) / attack / "data"
        und = json.loads((Path(args.runs) / attack / "attacked" / "metrics.json").read_text())
        for seed in args.seeds.split(","):
            out = Path(args.out) / f"{attack}_s{seed}"
            if not (out / "metrics.json").exists():
                rc = cli(["dbd", "--data", str(data), "--out", str(out), "--preset", args.preset, "--seed", seed,
                          "--no-progress"] + (["--resume"] if out.exists() else []))
                if rc:
                    raise SystemExit(f"dbd on {attack} seed {seed} failed ({rc})")
            rows.append((attack, seed, und, json.loads((out / "metrics.json").read_text())))
    print("\n| attack | seed | undefended BA / ASR | DBD BA / ASR / RA | after stage 2 BA / ASR "
          "| detection P / R / AUROC | head epoch kept | seconds (SimCLR + head + MixMatch = total) |")
    print("|---|---|---|---|---|---|---|---|")
    for attack, seed, u, m in rows:
        s2, d, t, g = m["after_stage2"], m["detection"], m["seconds"], m["stage2"]
        print(f"| {attack} | {seed} | {u['clean_accuracy']:.3f} / {u['attack_success_rate']:.3f} "
              f"| {m['clean_accuracy']:.3f} / {m['attack_success_rate']:.3f} / {m['robust_accuracy']:.3f} "
              f"| {s2['clean_accuracy']:.3f} / {s2['attack_success_rate']:.3f} "
              f"| {d['precision']:.3f} / {d['recall']:.3f} / {d['auroc']:.3f} "
              f"| {g.get('guard_epoch', '–')} of {g.get('epochs_trained', '–')} "
              f"| {t['simclr']:.0f} + {t['linear']:.0f} + {t['mixmatch']:.0f} = {t['total']:.0f} |")


if __name__ == "__main__":
    main()
