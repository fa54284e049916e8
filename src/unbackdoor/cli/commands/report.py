"""unbackdoor report: an HTML / Markdown / JSON report from a run directory or a tree of runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from unbackdoor.cli.commands.common import print_table
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.report.build import ReportOptions, build_report, stderr_log


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="build report.html / report.md / summary.json from run directories",
                       description="Find every run under RUN_DIR (folders holding metrics.json, model.json, "
                       "detection.csv; poisoned-data folders holding train.npz / attack.json) and write a "
                       "self-contained report.html (figures embedded, opens offline), report.md with its PNGs in "
                       "report_figures/, and summary.json.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a folder of runs (e.g. runs/demo)")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default RUN_DIR/report.html); the Markdown "
                   "report and summary.json go next to it")
    p.add_argument("--points", type=int, default=1000,
                   help="training images in each feature-space plot (t-SNE); 0 = no feature plot (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample, the example images and t-SNE")
    p.add_argument("--title", default="Backdoor defense report")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(args: argparse.Namespace) -> int:
    if args.points < 0:
        raise UnbackdoorError(f"--points must be >= 0, got {args.points}")
    s = build_report(args.run_dir, args.out, ReportOptions(embed_points=args.points, seed=args.seed, title=args.title,
                                                           log=None if args.quiet else stderr_log))
    rows = [{"attack": r["attack"], "model": r["label"], "clean_accuracy": r["clean_accuracy"],
             "asr": r["attack_success_rate"], "robust_accuracy": r["robust_accuracy"], "der": r["der"]} for r in s["rows"]]
    print_table(rows, ["attack", "model", "clean_accuracy", "asr", "robust_accuracy", "der"])
    f = s["files"]
    print(f"wrote {f['html']}, {f['markdown']} and {Path(f['html']).parent / 'summary.json'}")
    return 0
