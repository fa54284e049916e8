"""Supervised training (the attacked model, or a clean reference model)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.core.errors import EmptyDataset
from unbackdoor.data.augment import WeakAugment
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.training.engine import Engine, EngineOptions, checkpoint_precision
from unbackdoor.training.progress import Progress


@dataclass
class TrainConfig:
    """Supervised training settings. Defaults suit mnist5k / cnn-small on 2 CPU cores."""

    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = True  # random crop (pad = size/8) + flip where the dataset allows it
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]
    seconds: float
    precision: str


def fit(
    model: nn.Module,
    train: ImageDataset,
    cfg: TrainConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    evaluate: Callable[[nn.Module], dict] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` with cross-entropy on ``train``.

    Args:
        model: any classifier taking float (N, C, H, W) in [0, 1].
        train: the (possibly poisoned) training set.
        checkpoint: file written atomically after every epoch; with ``resume``
            an existing checkpoint is loaded and training continues after it.
        evaluate: called on the model after each epoch (rank 0); its dict joins the history.
    Returns the trained model (on the engine's device, eval mode) and per-epoch history.
    """
    cfg = cfg or TrainConfig()
    if len(train) == 0:
        raise EmptyDataset("cannot train on an empty dataset (0 images)")
    prec = checkpoint_precision(checkpoint) if (resume and checkpoint) else None
    eng = Engine(model, train.shape, cfg.engine, seed=cfg.seed, batch_size=cfg.batch_size, precision=prec)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    eng.set_optimizer(eng.model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                      cfg.schedule, cfg.epochs * steps_per_epoch)
    history: list[dict] = []
    start = 0
    if resume and checkpoint and Path(checkpoint).exists():
        st = eng.load(checkpoint)
        start, history = int(st["epoch"]) + 1, list(st.get("history", []))
    images = train.images.to(eng.device)
    labels = train.labels.to(eng.device)
    aug = WeakAugment(padding=max(1, train.shape[1] // 8), flip=bool(train.meta.get("flip", False))) if cfg.augment else None
    t_start = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        eng.train_model.train()
        gen = eng.generator(epoch)
        bar = Progress(steps_per_epoch, f"{desc} epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.engine.progress and eng.dist.is_main)
        tot_loss = torch.zeros((), device=eng.device)
        correct = torch.zeros((), device=eng.device)
        seen = 0
        for idx in eng.batches(len(train), cfg.batch_size, gen):
            x = images[idx].float().div_(255)
            if aug is not None:
                x = aug(x, gen)
            y = labels[idx]
            with eng.autocast():
                out = eng.train_model(eng.input(x))
                loss = F.cross_entropy(out.float(), y)
            eng.step(loss)
            tot_loss += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.update(len(y) * eng.dist.world_size)
        stats = torch.stack([tot_loss, correct, torch.tensor(float(seen), device=eng.device)])
        eng.dist.all_reduce_sum(stats)
        rec = {"epoch": epoch + 1, "loss": float(stats[0] / stats[2]), "train_accuracy": float(stats[1] / stats[2]),
               "lr": eng.optimizer.param_groups[0]["lr"], "images_per_second": bar.images_per_second}
        if evaluate is not None and eng.dist.is_main:
            rec.update(evaluate(eng.model))
        bar.close(**{k: v for k, v in rec.items() if k in ("loss", "train_accuracy", "clean_accuracy", "attack_success_rate")})
        history.append(rec)
        eng.save(checkpoint, epoch=epoch, history=history, config=asdict(cfg))
    eng.model.eval()
    return TrainResult(eng.model, history, time.perf_counter() - t_start, eng.precision.name)
