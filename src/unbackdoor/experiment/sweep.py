"""``unbackdoor sweep``: the attack x defense matrix, one experiment folder per attack
(``OUT/<attack>/``), then one comparison table and the report over all of them."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from unbackdoor.core import layout
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.experiment.leaderboard import write_leaderboard
from unbackdoor.experiment.run import Display, newer_than, read_or_none, run_experiment
from unbackdoor.experiment.spec import ExperimentSpec, parse_defenses
from unbackdoor.report import ReportOptions, build_report


def sweep(out: str | os.PathLike, attacks: list[str], defenses: tuple[str, ...] | str | None = None,
          dataset: str = "mnist5k", preset: str = "quick", seed: int = 0, force: bool = False, engine=None,
          embed_points: int = 500, root: str | None = None, configs: dict[str, Any] | None = None,
          display: Callable[[str], Display] | None = None, say: Callable[[str], None] | None = None) -> dict:
    """Run one experiment per attack, then write ``leaderboard.md`` / ``.csv`` and the
    HTML report over all of them. Finished cells are skipped on a re-run.

    ``display(attack_prefix)`` makes each experiment's display; ``say`` prints a line."""
    if not attacks:
        raise UnbackdoorError("a sweep needs at least one attack name")
    defenses = parse_defenses(defenses)
    specs = [ExperimentSpec(attack=a, dataset=dataset, defenses=defenses, preset=preset, seed=seed, root=root)
             for a in attacks]
    for s in specs:
        s.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnbackdoorError(f"output path {out} exists and is not a directory")
    say = say or (lambda msg: None)
    t0 = time.perf_counter()
    for i, s in enumerate(specs, 1):
        disp = display(f"[{s.attack} {i}/{len(specs)}] ") if display else None
        run_experiment(out / s.attack, s, engine=engine, force=force, display=disp, report=False, configs=configs)
    inputs = [p for s in specs for p in (out / s.attack / layout.EXPERIMENT, out / s.attack / layout.EVALUATION,
                                         *(out / s.attack).glob(f"*/{layout.METRICS}"))]
    if (newer_than(out / layout.SUMMARY, inputs) and (out / layout.LEADERBOARD_CSV).is_file()
            and isinstance(read_or_none(out / layout.SUMMARY), dict)):
        say(f"[sweep] report and leaderboard up to date ({out / layout.REPORT_HTML})")
        summary = read_or_none(out / layout.SUMMARY)
    else:
        say(f"[sweep] report over {len(specs)} attacks")
        summary = build_report(out, out / layout.REPORT_HTML, ReportOptions(embed_points=embed_points, seed=seed,
                                                                            title=f"unbackdoor sweep on {dataset}",
                                                                            log=say))
        write_leaderboard(out, summary["rows"])
    return {"rows": summary["rows"], "summary": summary, "total_seconds": time.perf_counter() - t0, "out": str(out)}
