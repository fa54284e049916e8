"""unbackdoor sweep: the attack x defense matrix and one comparison table."""
from __future__ import annotations

import argparse

from unbackdoor.cli.commands.common import add_experiment_args, engine_options, print_table
from unbackdoor.cli.display import StageDisplay, clock
from unbackdoor.experiment.spec import load_experiment_configs
from unbackdoor.experiment.sweep import sweep


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="run every attack x defense and write one comparison table",
                       description="For each attack: poison, train the undefended model, run each defense (one folder "
                       "per attack, OUT/<attack>/...), then write OUT/leaderboard.md, OUT/leaderboard.csv and "
                       "OUT/report.html. Re-running skips finished cells.")
    p.add_argument("--attacks", required=True, help="comma-separated attack names, e.g. badnets,blended,wanet")
    add_experiment_args(p, None, points=500)
    p.add_argument("--force", action="store_true", help="start every cell over")
    return p


def run(args: argparse.Namespace) -> int:
    on = not args.no_progress
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    res = sweep(args.out, attacks, args.defenses, dataset=args.dataset, preset=args.preset, seed=args.seed,
                force=args.force, engine=engine_options(args), embed_points=args.points,
                configs=load_experiment_configs(args.config, args.preset), root=args.root,
                display=lambda prefix: StageDisplay(0, prefix=prefix, enabled=on),
                say=StageDisplay(0, enabled=on).say)
    print()
    table = [{"attack": r["attack"], "model": r["label"], "clean_accuracy": r["clean_accuracy"],
              "asr": r["attack_success_rate"], "robust_accuracy": r["robust_accuracy"], "der": r["der"]} for r in res["rows"]]
    print_table(table, ["attack", "model", "clean_accuracy", "asr", "robust_accuracy", "der"])
    print(f"\nwrote {args.out}/leaderboard.md, leaderboard.csv, report.html · {clock(res['total_seconds'])} this run")
    return 0
