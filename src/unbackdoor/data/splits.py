"""Deterministic stratified splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.data.dataset import ImageDataset


@dataclass
class Splits:
    """train: what the (possibly attacked) model trains on; test: clean evaluation set;
    heldout: a clean pool the attacked model never sees (unlabeled data for cleansing)."""

    train: ImageDataset
    test: ImageDataset
    heldout: ImageDataset


def stratified_split(ds: ImageDataset, sizes: tuple[int, int, int], seed: int = 0) -> Splits:
    """Split ``ds`` into parts of the given sizes, keeping class proportions.

    Deterministic for a seed: the same seed always gives the same indices.
    """
    n = len(ds)
    if sum(sizes) > n or min(sizes) < 0:
        raise UnbackdoorError(f"split sizes {sizes} do not fit a dataset of {n} images")
    rng = np.random.default_rng(seed)
    labels = ds.labels.numpy()
    parts: list[list[int]] = [[], [], []]
    fracs = np.array(sizes, dtype=np.float64) / n
    # Per class: shuffle, then cut by the overall fractions (largest remainder keeps totals exact).
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    alloc = {c: np.floor(fracs * len(idx)).astype(int) for c, idx in per_class.items()}
    for k in range(3):
        short = sizes[k] - sum(a[k] for a in alloc.values())
        order = sorted(per_class, key=lambda c: -(fracs[k] * len(per_class[c]) - alloc[c][k]))
        i = 0
        while short > 0 and order:
            c = order[i % len(order)]
            if alloc[c].sum() < len(per_class[c]):
                alloc[c][k] += 1
                short -= 1
            i += 1
            if i > 10 * len(order) + n:
                break
    for c, idx in per_class.items():
        a = alloc[c]
        parts[0] += idx[: a[0]].tolist()
        parts[1] += idx[a[0] : a[0] + a[1]].tolist()
        parts[2] += idx[a[0] + a[1] : a[0] + a[1] + a[2]].tolist()
    out = [ds.subset(torch.as_tensor(np.sort(np.array(p, dtype=np.int64)))) for p in parts]
    return Splits(*out)
