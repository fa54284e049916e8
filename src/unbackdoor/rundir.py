"""Poisoned-data folders: what ``unbackdoor poison`` writes and every later
command reads.

Layout of DIR::

    train.npz        poisoned training set (images, labels, poisoned mask, true_labels)
    test.npz         clean test set
    heldout.npz      clean held-out split (never seen by the attacked model)
    attack.json      the attack's full spec (+ attack.safetensors: trigger tensors)
    config.yaml      the resolved configuration
    metrics.json     poisoning statistics
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .attacks.base import Attack, load_attack
from .data.dataset import ImageDataset
from .errors import UnbackdoorError
from .io import read_json


@dataclass
class PoisonedData:
    train: ImageDataset
    test: ImageDataset
    heldout: ImageDataset | None
    attack: Attack | None
    meta: dict

    @property
    def flip(self) -> bool:
        return bool(self.meta.get("flip", False))


def save_poisoned(folder: str | os.PathLike, train: ImageDataset, test: ImageDataset, heldout: ImageDataset,
                  attack: Attack | None) -> None:
    folder = Path(folder)
    train.save_npz(folder / "train.npz")
    test.save_npz(folder / "test.npz")
    heldout.save_npz(folder / "heldout.npz")
    if attack is not None:
        attack.save(folder)


def load_data(path: str | os.PathLike) -> PoisonedData:
    """Read a poisoned-data folder, or a single ``.npz`` (then there is no test set or attack:
    ``test`` is the same set, for convenience, and ``attack`` is None)."""
    p = Path(path)
    if not p.exists():
        raise UnbackdoorError(f"data path not found: {p}")
    if p.is_file():
        if p.suffix != ".npz":
            raise UnbackdoorError(f"{p} is not a .npz dataset file or a poisoned-data directory")
        ds = ImageDataset.load_npz(p)
        return PoisonedData(train=ds, test=ds, heldout=None, attack=None, meta={"source": str(p)})
    if not (p / "train.npz").exists():
        raise UnbackdoorError(f"{p} is not a poisoned-data directory (no train.npz); create one with 'unbackdoor poison'")
    meta = read_json(p / "metrics.json") if (p / "metrics.json").exists() else {}
    train = ImageDataset.load_npz(p / "train.npz", name="train")
    test = ImageDataset.load_npz(p / "test.npz", name="test") if (p / "test.npz").exists() else train
    heldout = ImageDataset.load_npz(p / "heldout.npz", name="heldout") if (p / "heldout.npz").exists() else None
    flip = bool(meta.get("flip", False))
    for ds in (train, test, heldout):
        if ds is not None:
            ds.meta.update({"flip": flip, "dataset": meta.get("dataset", "")})
    attack = load_attack(p) if (p / "attack.json").exists() else None
    if attack is not None and attack.shape != train.shape:
        raise UnbackdoorError(f"{p}: attack.json is for images {attack.shape} but train.npz holds {train.shape}")
    return PoisonedData(train, test, heldout, attack, meta)
