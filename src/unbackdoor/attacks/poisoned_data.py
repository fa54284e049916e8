"""Poisoned-data folders: what ``unbackdoor poison`` writes and every later
command reads.

Layout of DIR::

    train.npz        poisoned training set (images, labels, poisoned mask, true_labels)
    test.npz         clean test set
    heldout.npz      clean held-out split (never seen by the attacked model)
    originals.npz    the untouched images of every modified training sample (for clean reference models)
    attack.json      the attack's full spec (+ attack.safetensors: trigger tensors)
    config.yaml      the resolved configuration
    metrics.json     poisoning statistics
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from unbackdoor.attacks.base import Attack, load_attack
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import atomic_path, read_json
from unbackdoor.data.dataset import ImageDataset


@dataclass
class PoisonedData:
    train: ImageDataset
    test: ImageDataset
    heldout: ImageDataset | None
    attack: Attack | None
    meta: dict

    originals: tuple[torch.Tensor, torch.Tensor] | None = None  # (index int64 (M,), uint8 images (M,C,H,W))

    @property
    def flip(self) -> bool:
        return bool(self.meta.get("flip", False))

    def clean_train(self) -> ImageDataset:
        """The training split as it was before poisoning: original images and true labels.

        Clean-label attacks poison (possibly all) target-class samples, so dropping
        poisoned samples is not a clean reference; restoring them is.
        """
        ds = self.train
        images = ds.images.clone()
        if self.originals is not None:
            idx, orig = self.originals
            images[idx] = orig
        elif ds.poisoned is not None and bool(ds.poisoned.any()):
            raise UnbackdoorError("this data folder has no originals.npz: the clean training images are unknown")
        labels = ds.true_labels.clone() if ds.true_labels is not None else ds.labels.clone()
        return replace(ds, images=images, labels=labels, poisoned=None, true_labels=None, meta=dict(ds.meta))


def save_poisoned(folder: str | os.PathLike, train: ImageDataset, test: ImageDataset, heldout: ImageDataset,
                  attack: Attack | None, clean_train: ImageDataset | None = None) -> None:
    folder = Path(folder)
    train.save_npz(folder / "train.npz")
    if clean_train is not None:
        changed = torch.nonzero((clean_train.images != train.images).flatten(1).any(1)).flatten()
        with atomic_path(folder / "originals.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, index=changed.numpy(), images=clean_train.images[changed].numpy())
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
    originals = None
    if (p / "originals.npz").exists():
        try:
            with np.load(p / "originals.npz", allow_pickle=False) as z:
                originals = (torch.from_numpy(z["index"].astype(np.int64)), torch.from_numpy(z["images"]))
        except Exception as e:  # noqa: BLE001
            raise UnbackdoorError(f"corrupted file {p / 'originals.npz'}: {e}") from None
    if attack is not None and attack.shape != train.shape:
        raise UnbackdoorError(f"{p}: attack.json is for images {attack.shape} but train.npz holds {train.shape}")
    return PoisonedData(train, test, heldout, attack, meta, originals)
