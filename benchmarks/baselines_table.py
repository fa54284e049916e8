"""The comparison tables of every defense over one or more sweep folders (seeds).

    .venv/bin/python benchmarks/baselines_table.py runs/mn-s0 runs/mn-s1
    .venv/bin/python benchmarks/baselines_table.py runs/fm-s1 --detection

Reads only the sweep folders' ``<attack>/<run>/metrics.json`` (the run layout's schema).
Prints one Markdown table: per attack and defense, BA / ASR / RA / DER / seconds, one
column group per folder (seed). ``--detection`` adds the table of the detectors'
precision / recall / AUROC on the poisoned training samples beside DBD's split and its
short list of suspects.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from unbackdoor import metrics
from unbackdoor.core import layout
from unbackdoor.defenses import defense_names, get_defense


def _read(p: Path) -> dict | None:
    f = p / layout.METRICS
    return json.loads(f.read_text()) if f.is_file() else None


def _cell(m: dict | None, und: dict | None) -> str:
    if m is None or not m.get("final"):
        return "— | — | — | — | —"
    f = m["final"]
    der = m.get("der")
    if der is None and und and und.get("final"):  # a defense that trains from scratch (DBD)
        u = und["final"]
        der = metrics.der(u["clean_accuracy"], u["attack_success_rate"], f["clean_accuracy"], f["attack_success_rate"])
    secs = (m.get("seconds") or {}).get("total") if isinstance(m.get("seconds"), dict) else m.get("seconds")
    return (f"{f['clean_accuracy']:.3f} | {f['attack_success_rate']:.3f} | {f.get('robust_accuracy', float('nan')):.3f} | "
            f"{'—' if der is None else f'{der:.3f}'} | {'—' if secs is None else f'{secs:.0f}'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", help="sweep folders (e.g. one per seed)")
    ap.add_argument("--detection", action="store_true", help="also the detection table")
    args = ap.parse_args()
    roots = [Path(s) for s in args.sweeps]
    attacks = sorted({p.name for r in roots for p in r.iterdir() if (p / layout.EXPERIMENT).is_file()})
    names = [layout.UNDEFENDED_DIR, *defense_names()]
    head = "| attack | defense | labels | " + " | ".join(
        f"BA ({r.name}) | ASR | RA | DER | s" for r in roots) + " |"
    print(head)
    print("|---|---|---|" + "---|" * (5 * len(roots)))
    for a in attacks:
        for n in names:
            ms = [_read(r / a / n) for r in roots]
            if all(m is None for m in ms):
                continue
            label = "Undefended" if n == layout.UNDEFENDED_DIR else get_defense(n).label
            labels = "—" if n == layout.UNDEFENDED_DIR else str(next(
                (m.get("n_labelled") for m in ms if m and m.get("n_labelled")), 0))
            print(f"| {a} | {label} | {labels} | " + " | ".join(_cell(m, None if n == layout.UNDEFENDED_DIR else _read(r / a / layout.UNDEFENDED_DIR)) for m, r in zip(ms, roots)) + " |")
    if not args.detection:
        return
    print()
    print("| attack | detector | " + " | ".join(f"P ({r.name}) | R | AUROC | flagged" for r in roots) + " |")
    print("|---|---|" + "---|" * (4 * len(roots)))
    for a in attacks:
        for n in names[1:]:
            rows = {}
            for r in roots:
                m = _read(r / a / n)
                det = (m or {}).get("detection")
                if not det:
                    continue
                rows.setdefault(get_defense(n).label + " (split)" if "suspects" in det else get_defense(n).label,
                                []).append(det)
                if "suspects" in det:
                    rows.setdefault(get_defense(n).label + " suspects", []).append(det["suspects"])
            for label, dets in rows.items():
                cells = [f"{d.get('precision', float('nan')):.3f} | {d.get('recall', float('nan')):.3f} | "
                         f"{d['auroc']:.3f} | {d.get('flagged', d.get('n_flagged'))}" if d.get("auroc") is not None
                         else f"{d.get('precision', float('nan')):.3f} | {d.get('recall', float('nan')):.3f} | — | "
                              f"{d.get('flagged', d.get('n_flagged'))}" for d in dets]
                print(f"| {a} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
