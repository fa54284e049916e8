"""BCU (no labels) against the label-based post-training baselines (FT, NAD, FT-SAM, ...)
at clean-pool sizes 100, 250 and 500: does "on par with label-based defenses" hold when
the pool shrinks?

    .venv/bin/python benchmarks/pool_size.py --runs runs/mn-s0 --attacks badnets,blended --out runs/pool-size

``--runs`` is a sweep folder (``<attack>/data``, ``<attack>/undefended``). Each pool is a
class-stratified subset (seed 0) of the sweep's 500 clean held-out images, the same
images for every defense: BCU gets them without labels, the baselines with. Every run
is a real ``unbackdoor <defense> --preset quick`` (budgets in optimiser steps, the same
for every pool size); at the whole pool (500) the sweep's own cell is that run and is
reused. A finished run is reused unless ``--force``. Writes
``OUT/pool_size.json``, ``OUT/pool_size.md`` (the table) and ``OUT/pool_size.png``
(BA and ASR against the pool size, one panel pair per attack).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unbackdoor.attacks.poisoned_data import load_data  # noqa: E402
from unbackdoor.cli.main import main as cli  # noqa: E402
from unbackdoor.data.splits import stratified_split  # noqa: E402
from unbackdoor.defenses import get_defense  # noqa: E402


def pool_file(data_dir: Path, size: int, out: Path) -> Path:
    p = out / f"pool_{data_dir.parent.name}_{size}.npz"
    if not p.is_file():
        held = load_data(data_dir).heldout
        part = held if size >= len(held) else stratified_split(held, (size, 0, 0), seed=0).train
        part.save_npz(p)
    return p


def run_one(name: str, src: Path, pool: Path, run: Path, force: bool) -> dict:
    if force or not (run / "metrics.json").is_file():
        flag = "--clean" if get_defense(name).uses_labels else "--unlabeled"
        rc = cli([name, "--model", str(src / "undefended"), flag, str(pool), "--data", str(src / "data"),
                  "--out", str(run), "--preset", "quick", "--force", "--no-progress"])
        if rc:
            raise SystemExit(f"{name} failed for {run}")
    m = json.loads((run / "metrics.json").read_text())
    return {"clean_accuracy": m["final"]["clean_accuracy"], "attack_success_rate": m["final"]["attack_success_rate"],
            "seconds": (m.get("seconds") or {}).get("total"), "n_labelled": m.get("n_labelled", 0)}


def plot(results: dict, sizes: list[int], defenses: list[str], path: Path) -> None:
    attacks = list(results)
    fig, axes = plt.subplots(len(attacks), 2, figsize=(9, 3.2 * len(attacks)), squeeze=False)
    for i, attack in enumerate(attacks):
        for j, (key, title) in enumerate((("clean_accuracy", "clean accuracy"), ("attack_success_rate", "ASR"))):
            ax = axes[i][j]
            for name in defenses:
                ys = [results[attack][name][str(s)][key] for s in sizes]
                ax.plot(sizes, ys, marker="o", label=get_defense(name).label + ("" if get_defense(name).uses_labels
                                                                                  else " (no labels)"))
            ax.set_title(f"{attack}: {title}")
            ax.set_xlabel("clean pool size")
            ax.set_xticks(sizes)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="a sweep folder: <attack>/data and <attack>/undefended")
    ap.add_argument("--out", required=True)
    ap.add_argument("--attacks", default="badnets,blended")
    ap.add_argument("--defenses", default="bcu,ft,nad,ft-sam")
    ap.add_argument("--sizes", default="100,250,500")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    defenses = args.defenses.split(",")
    results: dict = {}
    for attack in args.attacks.split(","):
        src = Path(args.runs) / attack
        und = json.loads((src / "undefended" / "metrics.json").read_text())["final"]
        results[attack] = {"undefended": {"clean_accuracy": und["clean_accuracy"],
                                          "attack_success_rate": und["attack_success_rate"]}}
        for size in sizes:
            pool = pool_file(src / "data", size, out)
            whole = size >= len(load_data(src / "data").heldout)
            for name in defenses:
                # The whole held-out pool is what the sweep's own cell used: reuse that run.
                run = src / name if whole and (src / name / "metrics.json").is_file() else out / f"{attack}_{name}_{size}"
                r = run_one(name, src, pool, run, args.force and run.parent == out)
                results[attack].setdefault(name, {})[str(size)] = r
                print(f"{attack} {name} pool {size}: BA {r['clean_accuracy']:.3f} ASR {r['attack_success_rate']:.3f} "
                      f"({r['seconds']} s)", flush=True)
    (out / "pool_size.json").write_text(json.dumps(results, indent=1))
    lines = ["| attack | defense | labels | " + " | ".join(f"pool {s}: BA / ASR" for s in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for attack, per in results.items():
        u = per["undefended"]
        lines.append(f"| {attack} | undefended | — | " + " | ".join(
            f"{u['clean_accuracy']:.3f} / {u['attack_success_rate']:.3f}" for _ in sizes) + " |")
        for name in defenses:
            cells = [f"{per[name][str(s)]['clean_accuracy']:.3f} / {per[name][str(s)]['attack_success_rate']:.3f}"
                     for s in sizes]
            lab = "yes" if get_defense(name).uses_labels else "no"
            lines.append(f"| {attack} | {get_defense(name).label} | {lab} | " + " | ".join(cells) + " |")
    (out / "pool_size.md").write_text("\n".join(lines) + "\n")
    plot(results, sizes, defenses, out / "pool_size.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
