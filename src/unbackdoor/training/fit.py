"""Supervised training (the attacked model, or a clean reference model)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.core.config import require_positive
from unbackdoor.core.errors import EmptyDataset
from unbackdoor.data.augment import WeakAugment
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.training.engine import Engine, EngineOptions, checkpoint_precision
from unbackdoor.training.loop import Epoch, run_epochs
from unbackdoor.training.sam import SAMSettings, sam_step

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default objective: cross-entropy of ``model(x)`` (computed in fp32) and the logits."""
    out = model(x)
    return F.cross_entropy(out.float(), y), out


@dataclass
class OptimSettings:
    """The length, batch, optimiser and learning-rate schedule every trainer's settings share
    (their YAML keys stay flat: the configs subclass this). Defaults: BackdoorBench's
    fine-tuning and retraining (SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine, 100
    epochs, batch 256)."""

    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = True  # random crop (pad = size/8) + flip where the dataset allows it

    @property
    def budget(self) -> str:
        """The training's length as a user reads it ("1000 steps" where a ``steps`` budget is set)."""
        steps = getattr(self, "steps", None)
        return f"{steps} steps" if steps is not None else f"{self.epochs} epochs"

    def validate_optim(self, where: str) -> None:
        """A clear error for a non-positive length, batch or learning rate (or step budget)."""
        require_positive(where, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        if getattr(self, "steps", None) is not None:
            require_positive(where, steps=self.steps)


def optim_fields(settings: OptimSettings) -> dict:
    """``settings``' :class:`OptimSettings` fields, to build another trainer's settings from them."""
    return {f.name: getattr(settings, f.name) for f in fields(OptimSettings)}


@dataclass
class TrainConfig(OptimSettings):
    """Supervised training settings. Defaults suit mnist5k / cnn-small on 2 CPU cores."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]
    seconds: float
    precision: str


def fit(model: nn.Module, train: ImageDataset, cfg: TrainConfig | None = None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        evaluate: Callable[[nn.Module], dict] | None = None, desc: str = "train", objective: Objective | None = None,
        sam: SAMSettings | None = None, after_step: Callable[[nn.Module], None] | None = None,
        settings: dict | None = None, augment: Callable | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` with cross-entropy on ``train``.

    Args:
        model: any classifier taking float (N, C, H, W) in [0, 1].
        train: the (possibly poisoned) training set.
        checkpoint: file written atomically after every epoch; with ``resume``
            an existing checkpoint is loaded and training continues after it.
        evaluate: called on the model after each epoch (rank 0); its dict joins the history.
        objective: ``(model, x, y) -> (loss, logits)`` in place of cross-entropy (a fine-tuning
            defense's loss: distillation terms, label smoothing, ...).
        sam: take sharpness-aware steps (:func:`~unbackdoor.training.sam.sam_step`).
        after_step: called with the model after every optimiser step (e.g. to keep pruned
            weights at zero).
        settings: more settings a resumed run must share (a defense's own), beside ``cfg``'s.
        augment: ``(x, generator) -> x`` in place of the default crop + flip (with ``cfg.augment``).
        on_epoch: called with each epoch's record after its checkpoint.
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
    loss_of = objective or cross_entropy
    images = train.images.to(eng.device)
    labels = train.labels.to(eng.device)
    aug = None
    if cfg.augment:
        aug = augment or WeakAugment(padding=max(1, train.shape[1] // 8), flip=bool(train.meta.get("flip", False)))

    def one_epoch(ep: Epoch) -> dict:
        bar = ep.progress(steps_per_epoch)
        tot_loss = torch.zeros((), device=eng.device)
        correct = torch.zeros((), device=eng.device)
        seen = 0
        for idx in eng.batches(len(train), cfg.batch_size, ep.gen):
            x = images[idx].float().div_(255)
            if aug is not None:
                x = aug(x, ep.gen)
            y = labels[idx]
            xb = eng.input(x)

            def closure() -> tuple[torch.Tensor, torch.Tensor]:
                with eng.autocast():
                    return loss_of(eng.train_model, xb, y)

            if sam is not None:
                loss, out = sam_step(eng, closure, sam)
            else:
                loss, out = closure()
                eng.step(loss)
            if after_step is not None:
                after_step(eng.model)
            tot_loss += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.update(len(y) * eng.dist.world_size)
        stats = ep.all_reduce_sum(tot_loss, correct, float(seen))
        return {"loss": float(stats[0] / stats[2]), "train_accuracy": float(stats[1] / stats[2]),
                "lr": eng.optimizer.param_groups[0]["lr"], "images_per_second": bar.images_per_second}

    run_settings = asdict(cfg) | (settings or {}) | ({"sam": asdict(sam)} if sam is not None else {})
    t_start = time.perf_counter()
    history = run_epochs(eng, one_epoch, epochs=cfg.epochs, checkpoint=checkpoint, resume=resume, settings=run_settings,
                         desc=desc, summary=("loss", "train_accuracy", "clean_accuracy", "attack_success_rate"),
                         evaluate=evaluate, on_epoch=on_epoch)
    eng.model.eval()
    return TrainResult(eng.model, history, time.perf_counter() - t_start, eng.precision.name)
