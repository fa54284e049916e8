"""Error types for what a user can cause.

The CLI prints an :class:`UnbackdoorError` as a single line on stderr, with the
hint of its type (the flag that fixes it), and exits non-zero; anything else is
a bug and keeps its traceback. Library messages never name CLI flags.
"""
from __future__ import annotations


class UnbackdoorError(Exception):
    """A user-caused error (bad path, bad value, corrupted file) with a clear message."""


class UnknownName(UnbackdoorError):
    """A name that no registry (datasets, attacks, models, defenses, presets) knows."""


class EmptyDataset(UnbackdoorError):
    """A dataset (training set, unlabeled pool, test set) holds no images where some are needed."""


class OutputExists(UnbackdoorError):
    """An output folder holds files and the call asked neither to overwrite nor to resume them."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class OutputInUse(UnbackdoorError):
    """Another live process is writing the same output folder (it holds the folder's lock)."""


class NeedsLocalFiles(UnbackdoorError):
    """A dataset is read from the user's local files and none were named (or they are missing)."""


class RunFormatError(UnbackdoorError):
    """A folder is not a run this version can read (missing or foreign ``metrics.json``)."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UnknownName:
    """Error for an unknown registry name that lists the valid ones."""
    return UnknownName(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
