"""The Python API behind ``poison``, ``train`` and ``evaluate`` (the CLI only parses
arguments and calls these)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unbackdoor.attacks.base import check_rate, make_attack
from unbackdoor.attacks.poisoned_data import PoisonedData, load_data, save_poisoned
from unbackdoor.core import layout
from unbackdoor.core.config import to_dict
from unbackdoor.core.errors import EmptyDataset, OutputExists, UnbackdoorError
from unbackdoor.core.files import prepare_out_dir, rollback_on_failure, staged_dir, write_json, write_yaml
from unbackdoor.data.loaders import dataset_info, load_splits
from unbackdoor.metrics import evaluate as evaluate_model
from unbackdoor.models.model_dir import load_model, save_model
from unbackdoor.models.registry import build_for_data
from unbackdoor.training.distributed import current_context, run_on_main
from unbackdoor.training.engine import set_seed
from unbackdoor.training.fit import TrainConfig, fit


def poison(dataset: str, attack: str, out: str | os.PathLike, rate: float = 0.1, target: int = 0, seed: int = 0,
           mode: str = "all-to-one", root: str | None = None, params: dict[str, Any] | None = None,
           force: bool = False) -> PoisonedData:
    """Poison ``dataset`` with ``attack`` and write a poisoned-data folder to ``out``.

    Every input is validated before anything is written; the folder is built
    aside and moved into place at the end, so a failure leaves nothing behind.
    """
    check_rate(rate)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExists(f"output directory {out} exists and is not empty")
    info = dataset_info(dataset) if not Path(dataset).exists() else None
    splits = load_splits(dataset, root=root, seed=seed)
    atk = make_attack(attack, splits.train.shape, splits.train.num_classes, target=target, mode=mode, seed=seed, **(params or {}))
    t0 = time.perf_counter()
    ptrain, mask = atk.poison(splits.train, rate, seed=seed)
    flip = bool(splits.train.meta.get("flip", info.flip if info else False))
    stats = {
        "dataset": dataset, "attack": attack, "rate": rate, "target": target, "mode": mode, "seed": seed,
        "flip": flip, "n_train": len(ptrain), "n_poisoned": int(mask.sum()), "n_test": len(splits.test),
        "n_heldout": len(splits.heldout), "image_shape": list(ptrain.shape), "num_classes": ptrain.num_classes,
        "classes": list(ptrain.classes),
        "poison_seconds": round(time.perf_counter() - t0, 3),
    }
    if "noise_mask" in ptrain.meta:
        stats["n_noise"] = int(ptrain.meta["noise_mask"].sum())
    config = {"command": "poison", "dataset": dataset, "root": root, "attack": atk.spec(), "rate": rate, "seed": seed}
    with staged_dir(out, force=force) as tmp:
        save_poisoned(tmp, ptrain, splits.test, splits.heldout, atk, clean_train=splits.train)
        write_yaml(tmp / "config.yaml", config)
        write_json(tmp / "metrics.json", stats)
    ptrain.meta["flip"] = flip
    changed = torch.nonzero((splits.train.images != ptrain.images).flatten(1).any(1)).flatten()
    return PoisonedData(ptrain, splits.test, splits.heldout, atk, stats, (changed, splits.train.images[changed]))


def train(data: str | os.PathLike | PoisonedData, out: str | os.PathLike, model: str | nn.Module = "cnn-small",
          cfg: TrainConfig | None = None, resume: bool = False, force: bool = False, clean: bool = False) -> dict:
    """Train a model on a poisoned-data folder (or ``.npz``) and write a model directory to ``out``.

    ``clean=True`` trains on the training split as it was before poisoning
    (original images, true labels): the clean reference model.
    Returns the metrics dict (also written to ``out/metrics.json``).
    """
    cfg = cfg or TrainConfig()
    pd = data if isinstance(data, PoisonedData) else load_data(data)
    train_set = pd.train
    if clean:
        train_set = pd.clean_train()
    if len(train_set) == 0:
        raise EmptyDataset(f"the training set of {data if not isinstance(data, PoisonedData) else 'the data'} holds 0 images")
    arch = model if isinstance(model, str) else getattr(model, "arch", {}).get("name", "custom")
    set_seed(cfg.seed)
    net = build_for_data(model, pd.train) if isinstance(model, str) else model
    ctx = current_context()
    was_missing = not Path(out).exists()
    out = Path(run_on_main(ctx, lambda: prepare_out_dir(out, force=force, resume=resume)))
    with rollback_on_failure(out, was_missing, ctx.is_main and not resume):
        if ctx.is_main:
            write_yaml(out / layout.CONFIG, {"command": "train", "model": arch, "clean": clean, "train": to_dict(cfg),
                                             "data": "api" if isinstance(data, PoisonedData) else str(data)})
        evaluate = (lambda m: {k: v for k, v in evaluate_model(m, pd.test, pd.attack).items() if not k.startswith("n_")})
        res = fit(net, train_set, cfg, checkpoint=out / layout.CHECKPOINT, resume=resume, evaluate=evaluate)
        if not ctx.is_main:  # only rank 0 writes; the others return its model unsaved
            return {}
        measured = evaluate_model(res.model, pd.test, pd.attack)
        method, label = (layout.CLEAN_REFERENCE, "Clean reference") if clean else (layout.UNDEFENDED, "Undefended")
        # The measurements stay at the top level too, as train's metrics.json always had them.
        metrics = layout.run_metrics(method, label, measured, seconds={"total": round(res.seconds, 2)}, **measured,
                                     train_seconds=round(res.seconds, 2), epochs=cfg.epochs, precision=res.precision,
                                     model=arch, clean_reference=clean, n_train=len(train_set), world_size=ctx.world_size)
        if arch != "custom":
            save_model(res.model, out, classes=pd.train.classes,
                       provenance={"command": "train", "clean": clean, "attack": pd.attack.spec() if pd.attack else None})
        write_json(out / layout.HISTORY, res.history)
        write_json(out / layout.METRICS, metrics)
        return metrics


def evaluate(model: str | os.PathLike | nn.Module, data: str | os.PathLike | PoisonedData, device: str = "cpu") -> dict:
    """Clean accuracy / ASR / robust accuracy of a model on a data folder's test set."""
    pd = data if isinstance(data, PoisonedData) else load_data(data)
    net = load_model(model, device=device) if not isinstance(model, nn.Module) else model
    c = getattr(net, "arch", {}).get("in_channels")
    if c is not None and (c, net.arch["image_size"], net.arch["image_size"]) != pd.test.shape:
        raise UnbackdoorError(f"model expects images {(c, net.arch['image_size'], net.arch['image_size'])}, data has {pd.test.shape}")
    n_cls = getattr(net, "arch", {}).get("num_classes")
    if n_cls is not None and n_cls != pd.test.num_classes:
        raise UnbackdoorError(f"model has {n_cls} classes, data has {pd.test.num_classes}")
    return evaluate_model(net, pd.test, pd.attack)
