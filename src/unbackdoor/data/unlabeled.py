"""Unlabeled images for a cleansing step (BCU): from a poisoned-data directory's clean
held-out split, an ``.npz``, an image folder or a dataset name, converted to a model's
input shape (channels, size; ``fit='pad'`` frames them like MNIST). Labels are dropped."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from unbackdoor.core import layout
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import read_json
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.loaders import IMAGE_EXTS, _open_image, dataset_names, load_splits


def match_input(ds: ImageDataset, shape: tuple[int, int, int], fit: str = "resize") -> ImageDataset:
    """Convert uint8 images to the model's input (C, H, W): RGB <-> gray, then resize.

    ``fit='resize'`` stretches to H x W; ``fit='pad'`` resizes to 5/7 of the side and
    zero-pads to H x W (MNIST's framing: a 20 px digit in a 28 px frame).
    """
    c, h, w = shape
    x = ds.images
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            x = (0.299 * x[:, 0:1].float() + 0.587 * x[:, 1:2].float() + 0.114 * x[:, 2:3].float()).round().clamp(0, 255).to(torch.uint8)
        elif x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        else:
            raise UnbackdoorError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if fit not in ("resize", "pad"):
        raise UnbackdoorError(f"unknown fit {fit!r}; valid: resize, pad")
    th, tw = (h, w) if fit == "resize" else (max(1, round(h * 5 / 7)), max(1, round(w * 5 / 7)))
    if tuple(x.shape[-2:]) != (th, tw):
        x = F.interpolate(x.float(), size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    if fit == "pad" and (th, tw) != (h, w):
        py, px = h - th, w - tw
        x = F.pad(x, (px // 2, px - px // 2, py // 2, py - py // 2))
    out = ImageDataset(x, torch.zeros(len(x), dtype=torch.long), ["unlabeled"], name=ds.name, meta=dict(ds.meta))
    return out


def load_unlabeled(source: str | os.PathLike, shape: tuple[int, int, int], fit: str = "resize",
                   seed: int = 0, flip: bool | None = None) -> ImageDataset:
    """Unlabeled images for BCU, converted to the model's input ``shape`` (C, H, W).

    ``source``: a poisoned-data directory (its clean ``heldout`` split), an ``.npz``,
    a folder of images (flat or with class sub-folders), or a dataset name
    (its training split; e.g. ``digits`` as out-of-distribution data). Labels are
    dropped. ``flip`` overrides whether horizontal flips are a valid augmentation
    (default: the dataset's own setting, False for files and folders).
    """
    p = Path(source)
    if p.is_dir() and (p / layout.TRAIN).exists():  # a poisoned-data folder: its clean held-out split
        if not (p / layout.HELDOUT).exists():
            raise UnbackdoorError(f"{p} has no {layout.HELDOUT}: pass an .npz or folder of unlabeled images instead")
        ds = ImageDataset.load_npz(p / layout.HELDOUT, name="heldout")
        stats = read_json(p / layout.METRICS) if (p / layout.METRICS).is_file() else {}
        ds.meta.update({"flip": bool(stats.get("flip", False)), "dataset": stats.get("dataset", "")})
    elif p.is_file():
        if p.suffix != ".npz":
            raise UnbackdoorError(f"unlabeled source {p} must be an .npz, a folder of images, a poisoned-data "
                                  "directory or a dataset name")
        ds = ImageDataset.load_npz(p)
        ds.meta.setdefault("flip", False)
    elif p.is_dir():
        ds = _load_image_dir(p, shape)
    elif str(source) in dataset_names():
        try:
            ds = load_splits(str(source), seed=seed).train
        except UnbackdoorError as e:
            raise UnbackdoorError(f"unlabeled dataset {source!r}: {e}") from None
    else:
        raise UnbackdoorError(f"unlabeled source {source!r} not found: give a poisoned-data directory, an .npz, "
                              f"an image folder, or a dataset name ({', '.join(dataset_names())})")
    out = match_input(ds, shape, fit)
    out.meta["source"] = str(source)
    if flip is not None:
        out.meta["flip"] = bool(flip)
    return out


def _load_image_dir(root: Path, shape: tuple[int, int, int]) -> ImageDataset:
    import numpy as np


    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UnbackdoorError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
    arr = np.stack([_open_image(f, shape[1], shape[0]) for f in files])
    ds = ImageDataset.from_arrays(arr, np.zeros(len(arr), dtype=np.int64), ["unlabeled"], name=root.name, source=str(root))
    ds.meta["flip"] = False
    return ds
