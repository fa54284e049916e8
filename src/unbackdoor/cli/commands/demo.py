"""unbackdoor demo: poison -> backdoored model -> DBD -> BCU -> evaluation -> report, offline."""
from __future__ import annotations

import argparse

from unbackdoor.cli.commands.common import add_engine_args, engine_options, print_table


def add_parser(sub) -> argparse.ArgumentParser:
    from unbackdoor.attacks.base import attack_names

    p = sub.add_parser("demo", help="the whole story in one command: attack, defend with DBD and BCU, report",
                       description="Offline, on the embedded mnist5k by default: poison the training set, train the "
                       "undefended model, run DBD on the poisoned data and BCU on the undefended model with the held-out "
                       "unlabeled images, evaluate all three and write OUT/report.html. Re-running on the same OUT skips "
                       "finished stages and resumes an interrupted one.")
    p.add_argument("--attack", default="badnets", help=f"{', '.join(attack_names())} (default badnets)")
    p.add_argument("--dataset", default="mnist5k", help="dataset (default mnist5k: embedded, no download)")
    p.add_argument("--root", help="local files for cifar10, cifar100, gtsrb, imagefolder")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--preset", default="quick", choices=["quick", "paper"],
                   help="DBD / BCU settings: quick (a few minutes on a CPU) or paper (the papers' settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defenses", default="dbd,bcu", help="comma-separated subset of dbd,bcu (default both)")
    p.add_argument("--points", type=int, default=1000, help="training images in the report's t-SNE (0 = none)")
    p.add_argument("--force", action="store_true", help="start over: delete the experiment's folders in OUT first")
    p.add_argument("--config", help="YAML file with optional train:, dbd:, bcu: sections overriding the preset")
    add_engine_args(p)
    return p


def parse_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def print_rows(rows: list[dict]) -> None:
    table = [{"model": r["label"], "clean_accuracy": r["clean_accuracy"], "asr": r["attack_success_rate"],
              "robust_accuracy": r["robust_accuracy"], "der": r["der"],
              "seconds": None if r.get("seconds") is None else round(r["seconds"])} for r in rows]
    print_table(table, ["model", "clean_accuracy", "asr", "robust_accuracy", "der", "seconds"])


def run(args: argparse.Namespace) -> int:
    from unbackdoor.experiment.run import _clock, demo, load_experiment_configs

    res = demo(args.out, attack=args.attack, preset=args.preset, seed=args.seed, dataset=args.dataset,
               defenses=parse_list(args.defenses), force=args.force, engine=engine_options(args),
               embed_points=args.points, progress=not args.no_progress,
               configs=load_experiment_configs(args.config, args.preset), root=args.root)
    print()
    print_rows(res["rows"])
    for name, why in res["skipped"].items():
        print(f"note: {name.upper()} was skipped: {why}")
    print(f"\nreport: {args.out}/report.html  (also report.md, summary.json) · {_clock(res['total_seconds'])} this run")
    return 0
