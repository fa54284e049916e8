"""Loaders (on small files written here in each dataset's real on-disk format),
splits, the .npz exchange format, and the batched augmentations."""
from __future__ import annotations

import hashlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unbackdoor.cli.main import main as cli
from unbackdoor.core.errors import NeedsLocalFiles, UnbackdoorError
from unbackdoor.data import augment as A
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.loaders import (
    dataset_info,
    dataset_names,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_gtsrb,
    load_imagefolder,
    load_mnist5k,
    load_splits,
)
from unbackdoor.data.splits import stratified_split

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------- writers of real formats
def _dump_py2(path, obj) -> None:
    # The CIFAR archives were written by Python 2's cPickle (protocol 2, byte-string keys).
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in (np.arange(per_batch) + b) % 10]
        _dump_py2(base / f"data_batch_{b}", {b"batch_label": f"training batch {b} of 5".encode(), b"labels": y,
                                             b"data": x, b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]})
        xs.append(x)
        ys.append(y)
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = [int(v) for v in np.arange(n_test) % 10]
    _dump_py2(base / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt,
                                    b"filenames": [f"test_{i}.png".encode() for i in range(n_test)]})
    _dump_py2(base / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                      b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return np.concatenate(xs), np.concatenate(ys), xt, np.array(yt)


def _write_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in np.arange(n) % 100]
        _dump_py2(base / split, {b"filenames": [f"{split}_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                                 b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine], b"data": x})
        out[split] = (x, np.array(fine))
    _dump_py2(base / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return out["train"], out["test"]


GTSRB_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _write_gtsrb(root, per_class: int = 6, n_test: int = 9, with_gt: bool = True) -> None:
    """GTSRB as its archives unpack: class folders of .ppm images of varying size with a
    GT-<class>.csv each; Final_Test/Images/*.ppm with GT-final_test.test.csv (no labels);
    the separate ground-truth archive adds GT-final_test.csv (with ClassId) at the top."""
    train = root / "GTSRB" / "Final_Training" / "Images"
    for c, color in enumerate(GTSRB_COLORS):
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class):
            w, h = 29 + i, 31 + 2 * i  # real GTSRB images differ in size
            Image.new("RGB", (w, h), color).save(d / f"00000_{i:05d}.ppm")
            rows.append(f"00000_{i:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{c}")
        (d / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    test = root / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    unlabeled = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"]
    labeled = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(n_test):
        c = (i * 2) % 3
        Image.new("RGB", (40, 36), GTSRB_COLORS[c]).save(test / f"{i:05d}.ppm")
        unlabeled.append(f"{i:05d}.ppm;40;36;5;5;35;31")
        labeled.append(f"{i:05d}.ppm;40;36;5;5;35;31;{c}")
    (test / "GT-final_test.test.csv").write_text("\n".join(unlabeled) + "\n")
    if with_gt:
        (root / "GT-final_test.csv").write_text("\n".join(labeled) + "\n")


def _color_class(images: torch.Tensor) -> torch.Tensor:
    """Index into GTSRB_COLORS of solid-colour uint8 (N, 3, H, W) images (dominant channel)."""
    return images.float().mean(dim=(2, 3)).argmax(1)


def _write_imagefolder(root, classes=("cat", "dog", "eel"), per_class: int = 10, size: int = 16) -> None:
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((size, size, 3), 40 * c + i, dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.png")
        (d / "notes.txt").write_text("not an image")


# ---------------------------------------------------------------------------- CIFAR
def test_cifar10_reads_python_batches(tmp_path):
    x, y, xt, yt = _write_cifar10(tmp_path)
    train, test = load_cifar10(tmp_path)
    assert (len(train), len(test)) == (100, 30)
    assert train.shape == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == CIFAR10_NAMES
    # rows are channel-major (1024 R, 1024 G, 1024 B values, each row-major 32x32)
    assert torch.equal(train.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert torch.equal(test.images, torch.from_numpy(xt.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == y.tolist() and test.labels.tolist() == yt.tolist()
    # the root may also be the batches folder itself
    train2, _ = load_cifar10(tmp_path / "cifar-10-batches-py")
    assert torch.equal(train2.images, train.images)


def test_cifar10_splits_hold_out_ten_percent(tmp_path):
    _write_cifar10(tmp_path)
    s = load_splits("cifar10", root=tmp_path, seed=0)
    assert (len(s.train), len(s.heldout), len(s.test)) == (90, 10, 30)
    assert s.train.meta["flip"] and dataset_info("cifar10").flip
    assert torch.bincount(s.heldout.labels, minlength=10).tolist() == [1] * 10  # stratified


def test_cifar100_reads_fine_labels(tmp_path):
    (x, y), (xt, yt) = _write_cifar100(tmp_path)
    train, test = load_cifar100(tmp_path)
    assert (len(train), len(test), train.num_classes) == (200, 100, 100)
    assert train.classes[:3] == ["fine0", "fine1", "fine2"]
    assert torch.equal(train.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == y.tolist() and test.labels.tolist() == yt.tolist()
    s = load_splits("cifar100", root=tmp_path)
    assert (len(s.train), len(s.heldout), len(s.test)) == (180, 20, 100)


class _Payload:
    """Pickles to a call of ``exec`` that writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_cifar_pickle_with_malicious_global_is_refused_and_not_executed(tmp_path):
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": _Payload(marker), b"labels": [0]}
    _dump_py2(tmp_path / "cifar-10-batches-py" / "data_batch_3", evil)
    with pytest.raises(UnbackdoorError, match="data_batch_3"):
        load_cifar10(tmp_path)
    assert not marker.exists()
    # the payload is real: an ordinary unpickler would have run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control), protocol=2))
    assert control.exists()


def test_cifar_errors_are_clear(tmp_path, capsys):
    with pytest.raises(NeedsLocalFiles, match="local files"):
        load_splits("cifar10")
    assert cli(["poison", "--dataset", "cifar10", "--attack", "badnets", "--out", str(tmp_path / "p")]) == 2
    assert "pass --root PATH" in capsys.readouterr().err  # the CLI adds the flag that fixes it
    with pytest.raises(UnbackdoorError, match="not found"):
        load_splits("cifar10", root=tmp_path / "missing")
    with pytest.raises(UnbackdoorError, match="data_batch_1"):
        load_cifar10(tmp_path)  # exists, but holds no batches
    base = tmp_path / "cifar-10-batches-py"
    _write_cifar10(tmp_path)
    (base / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UnbackdoorError, match="test_batch"):
        load_cifar10(tmp_path)
    _dump_py2(base / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(UnbackdoorError, match="3072"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------- GTSRB / image folders
def test_gtsrb_class_folders_and_labelled_test_csv(tmp_path):
    _write_gtsrb(tmp_path)
    train, test = load_gtsrb(tmp_path, size=32)
    assert len(train) == 18 and train.shape == (3, 32, 32)  # varying sizes resized
    assert train.classes == ["0", "1", "2"]
    assert torch.equal(_color_class(train.images), train.labels)  # folder 0000k holds class k
    assert test is not None and len(test) == 9
    assert test.labels.tolist() == [(i * 2) % 3 for i in range(9)]
    assert torch.equal(_color_class(test.images), test.labels)
    s = load_splits("gtsrb", root=tmp_path, size=24)
    assert s.train.shape == (3, 24, 24) and len(s.test) == 9 and len(s.train) + len(s.heldout) == 18
    assert not s.train.meta["flip"]  # traffic signs: flipping changes meaning


def test_gtsrb_without_ground_truth_splits_the_training_set(tmp_path):
    _write_gtsrb(tmp_path, with_gt=False)  # only the unlabelled GT-final_test.test.csv
    train, test = load_gtsrb(tmp_path)
    assert test is None and len(train) == 18
    s = load_splits("gtsrb", root=tmp_path)
    assert len(s.train) + len(s.test) + len(s.heldout) == 18 and len(s.test) > 0


def test_imagefolder(tmp_path):
    _write_imagefolder(tmp_path)
    ds = load_imagefolder(tmp_path, size=None)
    assert (len(ds), ds.shape, ds.classes) == (30, (3, 16, 16), ["cat", "dog", "eel"])
    assert ds.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert int(ds.images[10, 0, 0, 0]) == 40  # dog/000.png
    small = load_imagefolder(tmp_path, size=8, channels=1)
    assert small.shape == (1, 8, 8)
    s = load_splits(str(tmp_path))  # a folder path works as the dataset name
    assert len(s.train) + len(s.test) + len(s.heldout) == 30 and s.train.meta["dataset"] == "imagefolder"


def test_imagefolder_train_test_layout(tmp_path):
    _write_imagefolder(tmp_path / "train")
    _write_imagefolder(tmp_path / "test", per_class=2)
    s = load_splits("imagefolder", root=tmp_path, size=16)
    assert len(s.test) == 6 and len(s.train) + len(s.heldout) == 30 and len(s.heldout) == 3


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UnbackdoorError, match="not found"):
        load_imagefolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnbackdoorError, match="sub-folders"):
        load_imagefolder(tmp_path / "empty")
    _write_imagefolder(tmp_path / "mixed")
    Image.new("RGB", (20, 16)).save(tmp_path / "mixed" / "cat" / "wide.png")
    with pytest.raises(UnbackdoorError, match="differ in size"):
        load_imagefolder(tmp_path / "mixed", size=None)
    (tmp_path / "mixed" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UnbackdoorError, match="broken.png"):
        load_imagefolder(tmp_path / "mixed")


# ---------------------------------------------------------------------------- .npz exchange format
def test_npz_grayscale_and_colour(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (100, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=gray, labels=np.arange(100) % 4)
    ds = ImageDataset.load_npz(tmp_path / "g.npz")
    assert ds.shape == (1, 12, 12) and ds.num_classes == 4 and ds.poisoned is None
    assert torch.equal(ds.images[:, 0], torch.from_numpy(gray))

    col = rng.integers(0, 256, (100, 10, 10, 3), dtype=np.uint8)
    poisoned = np.arange(100) % 10 == 0
    np.savez(tmp_path / "c.npz", images=col, labels=np.arange(100) % 5, poisoned=poisoned)
    ds = ImageDataset.load_npz(tmp_path / "c.npz")
    assert ds.shape == (3, 10, 10)
    assert torch.equal(ds.images.permute(0, 2, 3, 1), torch.from_numpy(col))  # HWC on disk, CHW in memory
    assert ds.poisoned.tolist() == poisoned.tolist()

    s = load_splits(str(tmp_path / "c.npz"))
    assert (len(s.train), len(s.test), len(s.heldout)) == (70, 20, 10)
    assert load_splits("npz", root=tmp_path / "c.npz").train.shape == (3, 10, 10)


def test_npz_roundtrip_keeps_everything(tmp_path):
    rng = np.random.default_rng(1)
    ds = ImageDataset.from_arrays(rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), np.arange(20) % 3,
                                  ["a", "b", "c"], poisoned=np.arange(20) < 4, true_labels=(np.arange(20) + 1) % 3)
    ds.save_npz(tmp_path / "d.npz")
    back = ImageDataset.load_npz(tmp_path / "d.npz")
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.classes == ["a", "b", "c"]
    assert torch.equal(back.poisoned, ds.poisoned) and torch.equal(back.true_labels, ds.true_labels)
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # no temp file left


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.zeros(4, int)}, "uint8"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, int)}, "labels"),
    ({"images": np.zeros((4, 8, 8), np.uint8)}, "missing"),
    ({"images": np.zeros((4, 8, 8, 4), np.uint8), "labels": np.zeros(4, int)}, "C in"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, float)}, "integers"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, 2, 3]), "classes": np.array(["a", "b"])},
     "class names"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, int), "poisoned": np.zeros(3, bool)}, "poisoned"),
    ({"images": np.array([None] * 4, dtype=object), "labels": np.zeros(4, int)}, "corrupted|pickle"),
])
def test_npz_mismatched_content_is_a_clear_error(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UnbackdoorError, match=match):
        ImageDataset.load_npz(tmp_path / "bad.npz")


def test_corrupted_npz_always_gives_unbackdoor_error(tmp_path):
    rng = np.random.default_rng(0)
    ImageDataset.from_arrays(rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), np.arange(30) % 3).save_npz(tmp_path / "ok.npz")
    good = (tmp_path / "ok.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    corruptions = [b"", b"not a zip file at all" * 5, good[: len(good) // 2], good[:-30]]
    for pos in range(0, len(good), 3):  # flip bytes everywhere: headers, deflate streams, directory
        for m in (0x01, 0x5A, 0xFF):
            corruptions.append(good[:pos] + bytes([good[pos] ^ m]) + good[pos + 1:])
    loaded = 0
    for data in corruptions:
        bad.write_bytes(data)
        try:
            ds = ImageDataset.load_npz(bad)
        except UnbackdoorError:
            continue
        loaded += 1  # a flip in an unchecked field (e.g. a timestamp) may load; it must then be intact
        assert len(ds) == 30 and ds.shape == (1, 8, 8)
    assert loaded < len(corruptions) // 4
    with pytest.raises(UnbackdoorError, match="not found"):
        ImageDataset.load_npz(tmp_path / "missing.npz")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("images.npy", b"\x93NUMPY garbage")
        z.writestr("labels.npy", b"")
    with pytest.raises(UnbackdoorError):
        ImageDataset.load_npz(bad)


# ---------------------------------------------------------------------------- embedded sets
@pytest.fixture(scope="module")
def mnist_full() -> ImageDataset:
    return load_mnist5k()


def _hashes(ds: ImageDataset) -> list[str]:
    return sorted(hashlib.sha1(img.numpy().tobytes() + bytes([int(lab)])).hexdigest() for img, lab in zip(ds.images, ds.labels))


def test_mnist5k_is_5000_real_digits(mnist_full):
    ds = mnist_full
    assert (len(ds), ds.shape, ds.images.dtype) == (5000, (1, 28, 28), torch.uint8)
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
    # digits: dark background, bright strokes in the middle
    assert ds.images[:, :, :3].float().mean() < 5 and ds.images[:, :, 10:18, 10:18].float().mean() > 60


def test_mnist5k_split_is_stratified_disjoint_and_deterministic(mnist_full, mnist_splits):
    s = mnist_splits
    assert (len(s.train), len(s.test), len(s.heldout)) == (3500, 1000, 500)
    for part, per_class in ((s.train, 350), (s.test, 100), (s.heldout, 50)):
        assert torch.bincount(part.labels, minlength=10).tolist() == [per_class] * 10
    # the three parts are a partition of the 5,000 images
    assert sorted(_hashes(s.train) + _hashes(s.test) + _hashes(s.heldout)) == _hashes(mnist_full)
    again = stratified_split(mnist_full, (3500, 1000, 500), seed=0)
    assert torch.equal(again.train.images, s.train.images) and torch.equal(again.heldout.labels, s.heldout.labels)
    other = stratified_split(mnist_full, (3500, 1000, 500), seed=1)
    assert not torch.equal(other.test.images, s.test.images)
    assert s.train.meta == {"dataset": "mnist5k", "split": "train", "flip": False}


def test_stratified_split_rejects_impossible_sizes(mnist_splits):
    with pytest.raises(UnbackdoorError, match="do not fit"):
        stratified_split(mnist_splits.heldout, (400, 100, 100))


def test_digits_resize_and_pad():
    d = load_digits()
    assert (len(d), d.shape, int(d.images.max())) == (1797, (1, 8, 8), 255)
    big = load_digits(size=28)
    assert big.shape == (1, 28, 28) and big.images[:, :, 10:18, 10:18].float().mean() > 30
    framed = load_digits(size=20, pad_to=28)  # MNIST-like: a 20x20 digit in a 28x28 frame
    assert framed.shape == (1, 28, 28)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert int(framed.images[:, 0][:, border].max()) == 0
    assert int(framed.images[:, 0, 4:24, 4:24].max()) == 255
    assert torch.equal(framed.labels, d.labels)
    s = load_splits("digits", size=20, pad_to=28)
    assert (len(s.train), len(s.test), len(s.heldout)) == (1259, 359, 179) and s.train.shape == (1, 28, 28)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(UnbackdoorError) as e:
        load_splits("mnist6k")
    for name in dataset_names():
        assert name in str(e.value)
    with pytest.raises(UnbackdoorError, match="mnist5k"):
        dataset_info("cifar11")


# ---------------------------------------------------------------------------- augmentation
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


AUGMENTATIONS = {
    "random_crop": lambda x, g: A.random_crop(x, 3, g),
    "hflip": lambda x, g: A.hflip(x, 0.5, g),
    "random_resized_crop": lambda x, g: A.random_resized_crop(x, gen=g),
    "color_jitter": lambda x, g: A.color_jitter(x, gen=g),
    "random_grayscale": lambda x, g: A.random_grayscale(x, 0.5, g),
    "gaussian_blur": lambda x, g: A.gaussian_blur(x, 1.0, gen=g),
    "random_noise": lambda x, g: A.random_noise(x, gen=g),
    "simclr": lambda x, g: A.SimCLRAugment()(x, g),
    "simclr_noise_noflip": lambda x, g: A.SimCLRAugment(flip=False, noise=True)(x, g),
    "weak": lambda x, g: A.WeakAugment(padding=4)(x, g),
    "contrast_only_jitter": lambda x, g: A.color_jitter(x, 0.0, 0.4, 0.0, 0.0, p=1.0, gen=g),
    "random_grating": lambda x, g: A.random_grating(x, 0.5, 1.0, g),
    "random_patches": lambda x, g: A.random_patches(x, 1.0, gen=g),
    "random_warp": lambda x, g: A.random_warp(x, 1.0, 1.0, gen=g),
}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_augmentation_keeps_shape_range_and_is_seeded(name, channels, size):
    fn = AUGMENTATIONS[name]
    x = torch.rand(16, channels, size, size, generator=_gen(0))
    y1 = fn(x.clone(), _gen(1))
    assert y1.shape == x.shape and y1.dtype == torch.float32
    assert float(y1.min()) >= -1e-6 and float(y1.max()) <= 1 + 1e-6
    assert torch.equal(y1, fn(x.clone(), _gen(1)))  # same seed: same result
    if name != "random_grayscale" or channels == 3:  # grayscale is a no-op on 1-channel images
        assert not torch.equal(y1, fn(x.clone(), _gen(2)))
        assert not torch.equal(y1, x)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_leaves_its_input_alone_and_passes_empty_batches(name):
    # several work in place on their own buffers: the caller's tensor must not change
    fn = AUGMENTATIONS[name]
    x = torch.rand(8, 3, 32, 32, generator=_gen(0))
    before = x.clone()
    fn(x, _gen(1))
    assert torch.equal(x, before)
    assert fn(torch.zeros(0, 3, 32, 32), _gen(1)).shape == (0, 3, 32, 32)


def test_random_crop_is_a_shifted_window():
    pad = 3
    x = torch.rand(32, 2, 10, 12, generator=_gen(0))
    out = A.random_crop(x, pad, _gen(5))
    xp = F.pad(x, (pad, pad, pad, pad))
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(out[i], xp[i, :, dy : dy + 10, dx : dx + 12])]
        assert hits, f"sample {i} is not a window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # each sample gets its own offset
    assert torch.equal(A.random_crop(x, 0, _gen(5)), x)


def test_augmentations_with_fixed_outcomes():
    x = torch.rand(6, 3, 8, 8, generator=_gen(0))
    assert torch.equal(A.hflip(x, 1.0, _gen(0)), x.flip(3))
    assert torch.equal(A.hflip(x, 0.0, _gen(0)), x)
    assert torch.equal(A.color_jitter(x, p=0.0, gen=_gen(0)), x)
    assert torch.allclose(A.gaussian_blur(x, p=0.0, gen=_gen(0)), x, atol=1e-6)
    g = A.random_grayscale(x, 1.0, _gen(0))
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    u8 = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=_gen(0))
    assert torch.equal(A.to_uint8(A.to_float(u8)), u8)
    assert A.weak_augment_for({"flip": True}, 32) == A.WeakAugment(padding=4, flip=True)
    assert A.weak_augment_for({}, 28) == A.WeakAugment(padding=3, flip=False)


def test_random_bits_are_fair_independent_and_seeded():
    bits = A.random_bits((50, 3, 33, 31), _gen(0))  # 153,450 bits: not a multiple of 8
    assert bits.shape == (50, 3, 33, 31) and bits.dtype == torch.uint8
    assert set(bits.unique().tolist()) == {0, 1}
    flat = bits.flatten().float()
    assert abs(float(flat.mean()) - 0.5) < 0.01  # 0.5 +- ~8 standard errors
    # neighbours (also across the 8 bits unpacked from one byte) are uncorrelated
    for lag in (1, 7, 8):
        c = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1]
        assert abs(float(c)) < 0.02, (lag, float(c))
    assert torch.equal(bits, A.random_bits((50, 3, 33, 31), _gen(0)))
    assert not torch.equal(bits, A.random_bits((50, 3, 33, 31), _gen(1)))
    assert A.random_bits((0, 1, 4, 4), _gen(0)).shape == (0, 1, 4, 4)
