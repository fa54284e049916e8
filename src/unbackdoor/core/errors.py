"""The one exception type for errors a user can cause.

The CLI prints an :class:`UnbackdoorError` as a single line on stderr and exits
non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UnbackdoorError(Exception):
    """A user-caused error (bad path, bad value, corrupted file) with a clear message."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UnbackdoorError:
    """Error for an unknown registry name that lists the valid ones."""
    return UnbackdoorError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


class EmptyDataset(UnbackdoorError):
    """A dataset (training set, unlabeled pool, test set) holds no images where some are needed."""
