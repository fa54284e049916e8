"""Command-line interface: a thin skin over the Python API.

Each subcommand lives in ``unbackdoor/commands/<name>.py`` with ``add_parser``
and ``run``; user errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from unbackdoor.core.errors import UnbackdoorError

# Order = order in --help. Adding a command is adding a module here.
COMMANDS = ["poison", "train", "evaluate", "dbd", "bcu", "demo", "report", "sweep"]


def build_parser() -> argparse.ArgumentParser:
    from unbackdoor import __version__

    parser = argparse.ArgumentParser(
        prog="unbackdoor",
        description="Defend image classifiers against backdoor attacks: poison data, train, "
        "defend with DBD or BCU, and measure.",
    )
    parser.add_argument("--version", action="version", version=f"unbackdoor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{name}"):
                continue  # command not available in this build
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    import warnings

    # Our warnings are advice to the user: one line, no source location.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"unbackdoor {args.command}: warning: {msg}\n"
    from unbackdoor.training.device import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        _init_distributed(args)
        rc = args._run(args)
        return int(rc or 0)
    except UnbackdoorError as e:
        # One line, always: messages may embed a library's multi-line text.
        print(f"unbackdoor {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unbackdoor {args.command}: interrupted (re-run with --resume to continue)", file=sys.stderr)
        return 130
    finally:
        _finish_distributed()


def _finish_distributed() -> None:
    # A process group left alive at interpreter exit can abort the process (gloo).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _init_distributed(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group; only rank 0 prints results."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from unbackdoor.training.device import pick_device
    from unbackdoor.training.distributed import init_distributed

    ctx = init_distributed(pick_device(getattr(args, "device", "auto")).type)
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


if __name__ == "__main__":
    raise SystemExit(main())
