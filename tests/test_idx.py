"""The IDX reader (MNIST / Fashion-MNIST / KMNIST / EMNIST format) on small files
written here byte by byte, and the real Fashion-MNIST files where they are installed."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.data.idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    NeedsLocalFiles,
    fashion_mnist_root,
    load_idx_split,
    read_idx,
    subset_per_class,
)
from unbackdoor.data.loaders import load_splits


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding, written from the format's definition: 0, 0, type code, ndim,
    big-endian uint32 sizes, then the big-endian values."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_mnist_layout(root, n_train=30, n_test=10, side=28, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        parts[part] = (images, labels)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{part}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return parts


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_read_idx_round_trips_every_type(tmp_path, gz):
    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-5, 7, 1 << 20], dtype=np.int32),
                np.array([[0.5, -1.25]], dtype=np.float32)):
        p = tmp_path / ("a.idx.gz" if gz else "a.idx")
        p.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
        out = read_idx(p)
        assert out.shape == arr.shape and out.dtype == arr.dtype and np.array_equal(out, arr)


def test_load_idx_split_reads_the_mnist_layout(tmp_path):
    parts = write_mnist_layout(tmp_path / "gz")
    tr = load_idx_split(tmp_path / "gz", "train", FASHION_MNIST_CLASSES)
    assert (len(tr), tr.shape, tr.classes) == (30, (1, 28, 28), FASHION_MNIST_CLASSES)
    assert torch.equal(tr.images[:, 0], torch.from_numpy(parts["train"][0]))
    assert torch.equal(tr.labels, torch.from_numpy(parts["train"][1].astype(np.int64)))
    write_mnist_layout(tmp_path / "raw", gz=False)
    te = load_idx_split(tmp_path / "raw", "test")
    assert len(te) == 10 and te.classes == [str(i) for i in range(10)]
    flipped = load_idx_split(tmp_path / "gz", "train", transpose=True)  # EMNIST stores images transposed
    assert torch.equal(flipped.images[:, 0], tr.images[:, 0].transpose(1, 2))
    s = load_splits("idx", root=tmp_path / "gz")
    assert (len(s.train), len(s.heldout), len(s.test)) == (27, 3, 10)


def test_idx_errors_are_clear(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(UnbackdoorError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    whole = idx_bytes(np.zeros((4, 5, 5), np.uint8))
    (tmp_path / "short").write_bytes(whole[:-3])
    with pytest.raises(UnbackdoorError, match=r"header says \(4, 5, 5\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(whole)[:20])
    with pytest.raises(UnbackdoorError, match="corrupted IDX"):
        read_idx(tmp_path / "broken.gz")
    with pytest.raises(UnbackdoorError, match="not found"):
        read_idx(tmp_path / "missing")
    with pytest.raises(NeedsLocalFiles, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist_root(tmp_path)
    with pytest.raises(NeedsLocalFiles):
        load_splits("fashion-mnist5k", root=tmp_path)
    parts = write_mnist_layout(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(parts["train"][1][:5])))
    with pytest.raises(UnbackdoorError, match="expected 30 labels"):
        load_idx_split(tmp_path / "mismatch", "train")


def test_fashion_mnist5k_from_files_in_the_real_layout(tmp_path):
    write_mnist_layout(tmp_path, n_train=6000, n_test=20)
    s = load_splits("fashion-mnist5k", root=tmp_path, seed=3)
    assert (len(s.train), len(s.test), len(s.heldout)) == (3500, 1000, 500)
    assert torch.bincount(s.train.labels, minlength=10).tolist() == [350] * 10
    assert s.train.classes == FASHION_MNIST_CLASSES
    # the 5,000 images are the same whatever the split seed; the split itself follows it
    other = load_splits("fashion-mnist5k", root=tmp_path, seed=4)
    pool = lambda sp: sorted(torch.cat([sp.train.images, sp.test.images, sp.heldout.images]).flatten(1).sum(1).tolist())  # noqa: E731
    assert pool(s) == pool(other) and not torch.equal(s.train.images, other.train.images)
    with pytest.raises(UnbackdoorError, match="fewer than 700"):
        subset_per_class(s.train, 700)


needs_real = pytest.mark.skipif(not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian's dataset-fashion-mnist is not installed (make setup installs it)")


@needs_real
def test_real_fashion_mnist():
    s = load_splits("fashion-mnist")
    assert (len(s.train), len(s.heldout), len(s.test)) == (54000, 6000, 10000)
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    assert s.train.meta["dataset"] == "fashion-mnist" and not s.train.meta["flip"]
    five = load_splits("fashion-mnist5k")
    assert torch.bincount(five.heldout.labels).tolist() == [50] * 10
    # real garments: a dark background around a bright object
    x = five.train.images.float()
    assert x[:, :, :, :2].mean() < 10 and x[:, :, 8:20, 8:20].mean() > 80
    assert five.train.classes[9] == "Ankle boot"
