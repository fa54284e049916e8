"""Shared fixtures: the embedded MNIST subset, a small trained clean model and a
small poisoned-data folder, built once per session on real data.

Everything that must be reproducible runs in fp32 (``precision="fp32"``): the
``auto`` precision is *measured* on the machine and may differ between runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unbackdoor.data.loaders import load_splits
from unbackdoor.data.splits import Splits, stratified_split
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import TrainConfig

FP32 = EngineOptions(device="cpu", precision="fp32", progress=False)  # reproducible: no measured precision


def _isolate_cache(root: Path) -> None:
    # The precision probe caches its result under UNBACKDOOR_CACHE (default ~/.cache):
    # tests, and the CLI subprocesses they start, must not read or write the user's cache.
    os.environ["UNBACKDOOR_CACHE"] = str(root)


@pytest.fixture(scope="session", autouse=True)
def unbackdoor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-session folder for the precision-probe cache (set in the environment)."""
    old = os.environ.get("UNBACKDOOR_CACHE")
    root = tmp_path_factory.mktemp("unbackdoor-cache")
    _isolate_cache(root)
    yield root
    if old is None:
        os.environ.pop("UNBACKDOOR_CACHE", None)
    else:
        os.environ["UNBACKDOOR_CACHE"] = old


def fp32_config(epochs: int = 2, **kw) -> TrainConfig:
    """A deterministic, quiet training config (fp32 on CPU, no progress output)."""
    return TrainConfig(epochs=epochs, engine=EngineOptions(device="cpu", precision="fp32", progress=False), **kw)


@pytest.fixture(scope="session")
def train_config():
    """Factory for deterministic fp32 training configs: ``train_config(epochs, **TrainConfig fields)``."""
    return fp32_config


@pytest.fixture(scope="session")
def mnist_splits() -> Splits:
    """mnist5k split 3,500 / 1,000 / 500 (seed 0). Treat as read-only."""
    return load_splits("mnist5k", seed=0)


@pytest.fixture(scope="session")
def mnist_small(mnist_splits: Splits) -> Splits:
    """A small stratified part of mnist5k (1,000 train / 300 test / 200 held-out) for quick runs."""
    tr = stratified_split(mnist_splits.train, (1000, 0, 0), seed=1).train
    te = stratified_split(mnist_splits.test, (300, 0, 0), seed=1).train
    ho = stratified_split(mnist_splits.heldout, (200, 0, 0), seed=1).train
    for ds in (tr, te, ho):
        ds.meta.update(mnist_splits.train.meta)
    return Splits(tr, te, ho)


@pytest.fixture(scope="session")
def clean_cnn(mnist_splits: Splits):
    """cnn-small trained 3 epochs (fp32, seed 0) on the clean mnist5k training split; eval mode, CPU.
    Shared: do not train or modify it."""
    from unbackdoor.models.registry import create
    from unbackdoor.training import fit
    from unbackdoor.training.engine import set_seed

    set_seed(0)
    model = create("cnn-small", num_classes=10, in_channels=1, image_size=28)
    res = fit(model, mnist_splits.train, fp32_config(epochs=3))
    for p in res.model.parameters():
        p.requires_grad_(False)
    return res.model.eval()


@pytest.fixture(scope="session")
def clean_cnn_dir(clean_cnn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clean_cnn`` saved as a model directory (model.safetensors + model.json)."""
    from unbackdoor.models.model_dir import save_model

    path = tmp_path_factory.mktemp("clean-cnn") / "model"
    save_model(clean_cnn, path, classes=[str(i) for i in range(10)], provenance={"fixture": "clean_cnn"})
    return path


@pytest.fixture(scope="session")
def small_poisoned_dir(mnist_small: Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A poisoned-data folder in the format ``unbackdoor poison`` writes (BadNets, 10%, target 0)
    built from ``mnist_small``: train.npz, test.npz, heldout.npz, attack.json, config.yaml, metrics.json."""
    from unbackdoor.attacks.base import make_attack
    from unbackdoor.attacks.poisoned_data import save_poisoned
    from unbackdoor.core.files import write_json, write_yaml

    folder = tmp_path_factory.mktemp("poisoned-small") / "data"
    folder.mkdir()
    atk = make_attack("badnets", mnist_small.train.shape, 10, target=0, seed=0)
    ptrain, mask = atk.poison(mnist_small.train, 0.1, seed=0)
    save_poisoned(folder, ptrain, mnist_small.test, mnist_small.heldout, atk)
    write_yaml(folder / "config.yaml", {"command": "poison", "dataset": "mnist5k-small", "attack": atk.spec()})
    write_json(folder / "metrics.json", {"dataset": "mnist5k", "attack": "badnets", "flip": False,
                                         "n_train": len(ptrain), "n_poisoned": int(mask.sum())})
    return folder


def run_cli(*args: str, timeout: float = 600, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m unbackdoor ARGS`` in a fresh process (text output captured)."""
    return subprocess.run([sys.executable, "-m", "unbackdoor", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def cli():
    """``cli(*args)`` runs ``python -m unbackdoor`` in a subprocess and returns the CompletedProcess."""
    return run_cli



@pytest.fixture(scope="session")
def digits_attacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An experiment folder on scikit-learn's digits: BadNets data (10%, target 0) and the
    backdoored cnn-small trained on it (15 epochs, fp32; ASR > 0.9), no defense yet. Tests
    of post-training defenses add their own: ``run_experiment(folder, ExperimentSpec(
    dataset="digits", defenses=(NAME,)), engine=FP32, configs={"train": TrainConfig(epochs=15)})``
    re-uses the data and the model. Do not modify data/ or undefended/."""
    from unbackdoor.experiment.run import run_experiment
    from unbackdoor.experiment.spec import ExperimentSpec

    out = tmp_path_factory.mktemp("digits-attacked") / "x"
    run_experiment(out, ExperimentSpec(dataset="digits", defenses=()), engine=FP32,
                   configs={"train": TrainConfig(epochs=15)}, report=False)
    return out
