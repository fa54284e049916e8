"""unbackdoor demo: poison -> backdoored model -> DBD -> BCU -> evaluation -> report, offline."""
from __future__ import annotations

import argparse

from unbackdoor.attacks.base import attack_names
from unbackdoor.cli.commands.common import add_experiment_args, engine_options, print_table
from unbackdoor.cli.display import StageDisplay, clock
from unbackdoor.defenses import get_defense
from unbackdoor.experiment.run import demo
from unbackdoor.experiment.spec import default_defenses, load_experiment_configs


def add_parser(sub) -> argparse.ArgumentParser:
    featured = " and ".join(get_defense(n).label for n in default_defenses())
    p = sub.add_parser("demo", help=f"the whole story in one command: attack, defend with {featured}, report",
                       description="Offline, on the embedded mnist5k by default: poison the training set, train the "
                       "undefended model, run each defense on what it needs (the poisoned data, the undefended model, "
                       "the held-out images), evaluate every model and write OUT/report.html. Re-running on the same "
                       "OUT skips finished stages and resumes an interrupted one.")
    p.add_argument("--attack", default="badnets", help=f"{', '.join(attack_names())} (default badnets)")
    add_experiment_args(p, "runs/demo", points=1000)
    p.add_argument("--force", action="store_true", help="start over: delete the experiment's folders in OUT first")
    return p


def print_rows(rows: list[dict]) -> None:
    table = [{"model": r["label"], "clean_accuracy": r["clean_accuracy"], "asr": r["attack_success_rate"],
              "robust_accuracy": r["robust_accuracy"], "der": r["der"],
              "seconds": None if r.get("seconds") is None else round(r["seconds"])} for r in rows]
    print_table(table, ["model", "clean_accuracy", "asr", "robust_accuracy", "der", "seconds"])


def run(args: argparse.Namespace) -> int:
    res = demo(args.out, attack=args.attack, preset=args.preset, seed=args.seed, dataset=args.dataset,
               defenses=args.defenses, force=args.force, engine=engine_options(args), embed_points=args.points,
               display=StageDisplay(0, enabled=not args.no_progress),
               configs=load_experiment_configs(args.config, args.preset), root=args.root)
    print()
    print_rows(res["rows"])
    print(f"\nreport: {args.out}/report.html  (also report.md, summary.json) · {clock(res['total_seconds'])} this run")
    return 0
