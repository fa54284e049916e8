"""In-memory image dataset: uint8 images (N, C, H, W), int64 labels, class names."""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import atomic_path


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), values 0..255.
        labels: int64 tensor (N,), values in [0, num_classes).
        classes: class names; ``len(classes)`` is the number of classes.
        poisoned: optional bool tensor (N,), True where a sample carries a backdoor.
        true_labels: optional int64 tensor (N,), the label before poisoning (dirty-label attacks).
        name: a short description for reports.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    poisoned: torch.Tensor | None = None
    true_labels: torch.Tensor | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UnbackdoorError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        if self.labels.shape != (len(self.images),):
            raise UnbackdoorError(
                f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}"
            )
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise UnbackdoorError(
                f"labels must lie in [0, {len(self.classes)}), got range "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        for attr in ("poisoned", "true_labels"):
            v = getattr(self, attr)
            if v is not None and v.shape != (len(self.images),):
                raise UnbackdoorError(f"{attr} must have shape ({len(self.images)},), got {tuple(v.shape)}")
        if self.poisoned is not None:
            self.poisoned = self.poisoned.to(torch.bool)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> "ImageDataset":
        idx = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            poisoned=None if self.poisoned is None else self.poisoned[idx],
            true_labels=None if self.true_labels is None else self.true_labels[idx],
            meta=dict(self.meta),
        )

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255)

    # ---- .npz exchange format (docs/design.md: images (N,H,W) or (N,H,W,C) uint8, labels, optional poisoned)
    def save_npz(self, path: str | Path) -> None:
        imgs = self.images.permute(0, 2, 3, 1).numpy()
        if imgs.shape[-1] == 1:
            imgs = imgs[..., 0]
        arrays = {
            "images": imgs,
            "labels": self.labels.numpy(),
            "classes": np.array(self.classes, dtype=np.str_),
        }
        if self.poisoned is not None:
            arrays["poisoned"] = self.poisoned.numpy()
        if self.true_labels is not None:
            arrays["true_labels"] = self.true_labels.numpy()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

    @classmethod
    def load_npz(cls, path: str | Path, name: str | None = None) -> "ImageDataset":
        """Read the ``.npz`` exchange format; never unpickles (``allow_pickle=False``)."""
        path = Path(path)
        if not path.is_file():
            raise UnbackdoorError(f"dataset file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                missing = {"images", "labels"} - files
                if missing:
                    raise UnbackdoorError(
                        f"{path} is not a dataset file: missing array(s) {sorted(missing)} "
                        "(expected 'images' uint8 (N,H,W) or (N,H,W,C) and 'labels')"
                    )
                images = z["images"]
                labels = z["labels"]
                classes = [str(c) for c in z["classes"]] if "classes" in files else None
                poisoned = z["poisoned"] if "poisoned" in files else None
                true_labels = z["true_labels"] if "true_labels" in files else None
        except UnbackdoorError:
            raise
        # zlib.error: damaged deflate data; NotImplementedError / RuntimeError: damaged zip
        # headers (unknown version, "encrypted" flag).
        except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise UnbackdoorError(f"corrupted or unreadable .npz file {path}: {e}") from None
        return cls.from_arrays(images, labels, classes, poisoned, true_labels, name or path.stem, source=str(path))

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        classes: list[str] | None = None,
        poisoned: np.ndarray | None = None,
        true_labels: np.ndarray | None = None,
        name: str = "",
        source: str = "arrays",
    ) -> "ImageDataset":
        """Build from numpy arrays in HWC layout: images uint8 (N,H,W) or (N,H,W,C)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise UnbackdoorError(f"{source}: 'images' must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UnbackdoorError(
                f"{source}: 'images' must have shape (N,H,W) or (N,H,W,C) with C in {{1,3}}, got {images.shape}"
            )
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(images):
            raise UnbackdoorError(
                f"{source}: 'labels' must have shape ({len(images)},) to match 'images', got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise UnbackdoorError(f"{source}: 'labels' must be integers, got {labels.dtype}")
        if len(labels) and labels.min() < 0:
            raise UnbackdoorError(f"{source}: 'labels' must be >= 0, got {labels.min()}")
        n_cls = int(labels.max()) + 1 if len(labels) else 0
        if classes is None:
            classes = [str(i) for i in range(n_cls)]
        elif len(classes) < n_cls:
            raise UnbackdoorError(f"{source}: {len(classes)} class names but labels go up to {n_cls - 1}")
        if poisoned is not None and np.asarray(poisoned).shape != (len(images),):
            raise UnbackdoorError(f"{source}: 'poisoned' must have shape ({len(images)},)")
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            labels=torch.from_numpy(labels.astype(np.int64)),
            classes=list(classes),
            poisoned=None if poisoned is None else torch.from_numpy(np.asarray(poisoned).astype(bool)),
            true_labels=None if true_labels is None else torch.from_numpy(np.asarray(true_labels).astype(np.int64)),
            name=name,
        )
