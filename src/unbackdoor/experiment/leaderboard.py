"""The sweep's comparison table: ``leaderboard.csv`` (exact numbers) and ``leaderboard.md``."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from unbackdoor.core import layout
from unbackdoor.core.files import write_text
from unbackdoor.report.content import num, pct

LEADERBOARD_COLUMNS = ["attack", "model", "clean_accuracy", "attack_success_rate", "robust_accuracy", "der",
                       "detection_recall", "detection_precision", "labelled_images", "seconds", "run_dir"]


def leaderboard_records(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        det = r.get("detection") or {}
        out.append({"attack": r.get("attack"), "model": r.get("label"), "clean_accuracy": r.get("clean_accuracy"),
                    "attack_success_rate": r.get("attack_success_rate"), "robust_accuracy": r.get("robust_accuracy"),
                    "der": r.get("der"), "detection_recall": det.get("recall"),
                    "detection_precision": det.get("precision"), "labelled_images": r.get("n_labelled"),
                    "seconds": r.get("seconds"),
                    "run_dir": r.get("run_dir")})
    return out


def write_leaderboard(out: Path, rows: list[dict]) -> None:
    recs = leaderboard_records(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LEADERBOARD_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in recs:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_text(out / layout.LEADERBOARD_CSV, buf.getvalue())
    lines = ["# Leaderboard", "", "| attack | model | clean accuracy | ASR | robust accuracy | DER | detection recall | "
             "labelled clean images | time |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        secs = "—" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        lines.append(f"| {r['attack']} | {r['model']} | {pct(r['clean_accuracy'])} | {pct(r['attack_success_rate'])} | "
                     f"{pct(r['robust_accuracy'])} | {num(r['der'])} | {num(r['detection_recall'])} | "
                     f"{r['labelled_images'] or '—'} | {secs} |")
    lines += ["", "ASR: attack success rate on triggered test images whose true label is not the target. "
              "DER against the undefended model of the same attack (1 = backdoor removed at no accuracy cost). "
              "Labelled clean images: how many a label-based baseline was given (DBD and BCU use none).", ""]
    write_text(out / layout.LEADERBOARD_MD, "\n".join(lines))
