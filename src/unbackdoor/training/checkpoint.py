"""Atomic training checkpoints.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values
(model/optimizer/scheduler state, epoch, history); it is always read back with
``torch.load(weights_only=True)``, so even a tampered checkpoint cannot run
code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import atomic_path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UnbackdoorError(f"checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - corrupted or unsafe content
        raise UnbackdoorError(f"corrupted checkpoint {path}: {str(e).splitlines()[0]}") from None
