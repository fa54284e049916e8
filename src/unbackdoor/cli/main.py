"""Command-line interface: a thin skin over the Python API.

Each subcommand lives in ``unbackdoor/cli/commands/<name>.py`` with ``add_parser``
and ``run``; each registered defense gets one from :mod:`unbackdoor.cli.defense_command`.
User errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from unbackdoor.cli.defense_command import add_defense_parser
from unbackdoor.core.errors import NeedsLocalFiles, OutputExists, UnbackdoorError
from unbackdoor.core.version import __version__
from unbackdoor.defenses import defenses
from unbackdoor.training.device import pick_device, tune_cpu_allocator
from unbackdoor.training.distributed import init_distributed

# Order = order in --help (every registered defense comes after "evaluate").
# Adding a command is adding a module here; a defense brings its own command.
BEFORE_DEFENSES = ["poison", "train", "evaluate"]
AFTER_DEFENSES = ["demo", "report", "sweep"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unbackdoor",
        description="Defend image classifiers against backdoor attacks: poison data, train, "
        "defend, and measure.",
    )
    parser.add_argument("--version", action="version", version=f"unbackdoor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in BEFORE_DEFENSES:
        _add_command(sub, name)
    for defense in defenses():
        add_defense_parser(sub, defense)
    for name in AFTER_DEFENSES:
        _add_command(sub, name)
    return parser


def _add_command(sub, name: str) -> None:
    mod = importlib.import_module(f"unbackdoor.cli.commands.{name}")
    p = mod.add_parser(sub)
    p.set_defaults(_run=mod.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    import warnings

    # Our warnings are advice to the user: one line, no source location.
    warnings.formatwarning = lambda msg, cat, *a, **k: f"unbackdoor {args.command}: warning: {msg}\n"

    tune_cpu_allocator()
    try:
        _init_distributed(args)
        rc = args._run(args)
        return int(rc or 0)
    except UnbackdoorError as e:
        # One line, always: messages may embed a library's multi-line text.
        print(f"unbackdoor {args.command}: error: {' '.join(str(e).split())}{_hint(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unbackdoor {args.command}: interrupted (re-run with --resume to continue)", file=sys.stderr)
        return 130
    finally:
        _finish_distributed()


def _hint(e: UnbackdoorError, args: argparse.Namespace) -> str:
    """The flag that fixes an error of this type, where the command has it."""
    if isinstance(e, OutputExists) and hasattr(args, "force"):
        resume = " or --resume to continue" if e.resumable and hasattr(args, "resume") else ""
        return f"; pass --force to overwrite{resume}"
    if isinstance(e, NeedsLocalFiles) and hasattr(args, "root"):
        return "; pass --root PATH"
    return ""


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

    ctx = init_distributed(pick_device(getattr(args, "device", "auto")).type)
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


if __name__ == "__main__":
    raise SystemExit(main())
