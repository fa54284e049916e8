"""IDX files: the format of MNIST, Fashion-MNIST, KMNIST and EMNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number
of dimensions), one big-endian uint32 per dimension, then the values in C
order. Images are ``idx3`` (N, H, W) uint8, labels ``idx1`` (N,) uint8. Files
may be gzipped (``*.gz``, as the datasets are distributed) or raw.

Nothing here downloads: Fashion-MNIST is read from Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``)
or from any folder holding the four files.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from unbackdoor.core.errors import NeedsLocalFiles, UnbackdoorError
from unbackdoor.data.dataset import ImageDataset

# type code -> numpy dtype (big-endian where it matters)
_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# The four files of a dataset in the MNIST layout (train / test, images / labels).
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a numpy array of its stored shape and type."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UnbackdoorError(f"file not found: {path}") from None
    except (OSError, EOFError) as e:  # a damaged gzip stream
        raise UnbackdoorError(f"corrupted IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise UnbackdoorError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise UnbackdoorError(f"corrupted IDX file {path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_TYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != need:
        raise UnbackdoorError(f"corrupted IDX file {path}: header says {shape} ({need} bytes of data), "
                              f"file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise NeedsLocalFiles(f"{stem}[.gz] not found in {root}")


def load_idx_split(root: str | os.PathLike, part: str, classes: list[str] | None = None,
                   name: str = "idx", transpose: bool = False) -> ImageDataset:
    """One part (``train`` or ``test``) of a dataset in the MNIST file layout under ``root``.

    ``transpose`` swaps height and width (EMNIST stores its images transposed)."""
    root = Path(root)
    img_stem, lab_stem = IDX_FILES[part]
    images, labels = read_idx(_find(root, img_stem)), read_idx(_find(root, lab_stem))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UnbackdoorError(f"{root}/{img_stem}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UnbackdoorError(f"{root}/{lab_stem}: expected {len(images)} labels, got shape {labels.shape}")
    if transpose:
        images = images.transpose(0, 2, 1)
    n_cls = int(labels.max()) + 1 if len(labels) else 0
    return ImageDataset.from_arrays(images, labels.astype(np.int64), classes or [str(i) for i in range(n_cls)],
                                    name=f"{name}-{part}", source=str(root))


def fashion_mnist_root(root: str | os.PathLike | None) -> Path:
    """Where Fashion-MNIST's files are: ``root`` if given, else the Debian package's folder."""
    path = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not any((path / f"{s}{ext}").is_file() for s in IDX_FILES["train"][:1] for ext in (".gz", "")):
        how = ("install Debian's package: apt-get install -y dataset-fashion-mnist (make setup does it where it can), "
               "or point the loader at a folder holding train-images-idx3-ubyte.gz and the three other IDX files")
        raise NeedsLocalFiles(f"Fashion-MNIST not found in {path}; {how}")
    return path


def subset_per_class(ds: ImageDataset, per_class: int, seed: int = 0) -> ImageDataset:
    """``per_class`` images of every class, drawn without replacement with ``seed``, in index order."""
    rng = np.random.default_rng(seed)
    labels = ds.labels.numpy()
    picks = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise UnbackdoorError(f"class {ds.classes[c]!r} has {len(idx)} images, fewer than {per_class}")
        picks.append(rng.choice(idx, per_class, replace=False))
    return ds.subset(np.sort(np.concatenate(picks)))
