"""BCU acceptance table on mnist5k: for each attack, the undefended model, BCU
(quick preset, the 500 clean held-out images as unlabeled data), BCU with
out-of-distribution unlabeled images (scikit-learn digits stretched to 28x28,
and resized to 20x20 + zero-padded like MNIST), and the two ablations at the
same budget (distillation without re-initialisation; fine-tuning the teacher on
its own pseudo-labels), with our defaults and with the paper's BCU (``-paper``:
the student-side gratings off). A finished row is reused unless ``--force``.

    .venv/bin/python benchmarks/attacks_table.py --out runs/attacks     # data + attacked models
    .venv/bin/python benchmarks/bcu_table.py --runs runs/attacks --out runs/bcu_table

Every row is a real ``unbackdoor bcu`` CLI run (in-process); prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from unbackdoor.cli.main import main as cli

# OOD: 1,259 digits images x 40 epochs at batch 32 = the same 1,600 steps as 500 x 100.
VARIANTS = {
    "bcu": [],
    "ood-resize": ["--unlabeled", "digits", "--fit", "resize", "--epochs", "40"],
    "ood-pad": ["--unlabeled", "digits", "--fit", "pad", "--epochs", "40"],
    "no-reinit": ["--ablation", "no-reinit"],
    "pseudo-label": ["--ablation", "pseudo-label"],
    # the paper's BCU and its ablations: the student-side gratings off
    "bcu-paper": ["--config", "GRATING_OFF"],
    "no-reinit-paper": ["--ablation", "no-reinit", "--config", "GRATING_OFF"],
    "pseudo-label-paper": ["--ablation", "pseudo-label", "--config", "GRATING_OFF"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/attacks", help="benchmarks/attacks_table.py's output folder")
    ap.add_argument("--out", default="runs/bcu_table")
    ap.add_argument("--attacks", default="badnets,blended,wanet,sig")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="re-run finished rows")
    args = ap.parse_args()
    variants = args.variants.split(",")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    off = Path(args.out) / "grating_off.yaml"
    off.write_text("grating: 0.0\n")
    res: dict[str, dict] = {}
    for attack in args.attacks.split(","):
        data, model = Path(args.runs) / attack / "data", Path(args.runs) / attack / "attacked"
        for v in variants:
            out = Path(args.out) / f"{attack}_{v}"
            cmd = ["bcu", "--model", str(model), "--data", str(data), "--out", str(out), "--preset", "quick",
                   "--seed", str(args.seed), "--force", "--no-progress"]
            if (out / "metrics.json").exists() and not args.force:  # finished: reuse
                res[f"{attack}/{v}"] = json.loads((out / "metrics.json").read_text())
                continue
            if "--unlabeled" not in VARIANTS[v]:
                cmd += ["--unlabeled", str(data)]
            rc = cli(cmd + [str(off) if a == "GRATING_OFF" else a for a in VARIANTS[v]])
            if rc:
                raise SystemExit(f"{' '.join(cmd)} failed ({rc})")
            m = json.loads((out / "metrics.json").read_text())
            res[f"{attack}/{v}"] = m
    print("\n| attack | undefended BA / ASR | " + " | ".join(f"{v} BA / ASR" for v in variants) + " | BCU RA / DER | BCU distillation s |")
    print("|---|---|" + "---|" * len(variants) + "---|---|")
    for attack in args.attacks.split(","):
        first = res[f"{attack}/{variants[0]}"]["before"]
        cells = [f"{res[f'{attack}/{v}']['after']['clean_accuracy']:.3f} / {res[f'{attack}/{v}']['after']['attack_success_rate']:.3f}"
                 for v in variants]
        b = res.get(f"{attack}/bcu")
        tail = f"{b['after']['robust_accuracy']:.3f} / {b['der']:.3f} | {b['distill_seconds']:.0f}" if b else "– | –"
        print(f"| {attack} | {first['clean_accuracy']:.3f} / {first['attack_success_rate']:.3f} | " + " | ".join(cells) + f" | {tail} |")


if __name__ == "__main__":
    main()
