"""Argument groups shared by several subcommands."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.defenses import defense_names
from unbackdoor.experiment.spec import default_defenses
from unbackdoor.training.engine import EngineOptions


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps (default: auto)")
    g.add_argument("--precision", default="auto",
                   help="auto (measured on this machine), fp32, bf16, fp16, optionally +channels_last (default: auto)")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun: synchronise BatchNorm across ranks")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (helps on GPUs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(device=args.device, precision=args.precision, sync_bn=args.sync_bn,
                         compile=args.compile, progress=not args.no_progress)


def add_out_args(p: argparse.ArgumentParser, resumable: bool = True) -> None:
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force/--resume)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as YAML scalars/lists (3, 0.2, [1, 2], true, text)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UnbackdoorError(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def print_table(rows: list[dict[str, Any]], columns: list[str], file=None) -> None:
    """A small aligned text table (fractions printed with 3 decimals)."""
    file = file or sys.stdout

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def add_defenses_arg(p: argparse.ArgumentParser) -> None:
    names = ", ".join(defense_names())
    featured = ",".join(default_defenses())
    p.add_argument("--defenses", help=f"comma-separated defenses ({names}) or 'all' (default {featured})")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    sections = ", ".join(f"{n}:" for n in ["train", *defense_names()])
    p.add_argument("--config", help=f"YAML file with optional sections ({sections}) overriding the preset")


def add_experiment_args(p: argparse.ArgumentParser, out_default: str | None, points: int) -> None:
    """The flags ``demo`` and ``sweep`` share (besides which attacks)."""
    p.add_argument("--dataset", default="mnist5k", help="dataset (default mnist5k: embedded, no download)")
    p.add_argument("--root", help="local files for cifar10, cifar100, gtsrb, imagefolder, idx, fashion-mnist")
    if out_default is None:
        p.add_argument("--out", required=True, help="output folder")
    else:
        p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    p.add_argument("--preset", default="quick", choices=["quick", "paper"],
                   help="the defenses' settings: quick (a few minutes on a CPU) or paper (the papers' settings)")
    p.add_argument("--seed", type=int, default=0)
    add_defenses_arg(p)
    p.add_argument("--points", type=int, default=points, help="training images in each t-SNE of the report (0 = none)")
    add_config_arg(p)
    add_engine_args(p)
