"""What every post-training defense shares: it changes a copy of a suspicious trained
model using a small pool of clean images, and writes the same run folder.

A subclass of :class:`PostTrainingDefense` implements only :meth:`~PostTrainingDefense.defend`
(the method itself); :meth:`~PostTrainingDefense.run` checks the inputs, prepares the
output folder (resume / force / roll back on failure), measures the model before and
after on the test set, and writes ``config.yaml``, the model directory, ``history.json``
and ``metrics.json`` (with ``n_labelled``: how many labelled images it used).
:class:`FineTuneConfig` holds the fine-tuning settings FT, Fine-Pruning, NAD and FT-SAM
share, and :func:`fine_tune_settings` turns them into the trainer's ``TrainConfig``.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from unbackdoor.core import layout
from unbackdoor.core.errors import EmptyDataset
from unbackdoor.core.files import prepare_out_dir, rollback_on_failure, write_json, write_yaml
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.defenses.base import Defense, DefenseInputs, DefenseResult, Flag, Progress
from unbackdoor.metrics import der, evaluate
from unbackdoor.models.model_dir import save_model
from unbackdoor.training.distributed import current_context, run_on_main
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import OptimSettings, TrainConfig, fit

# The quick presets' budget of the label-based fine-tuning defenses, in optimiser steps:
# BackdoorBench's 100 epochs of batch 256 on 5% of CIFAR-10 (2,500 images) take 1,000
# steps; the same count at batch 64 fits 2 CPU cores and any pool size.
QUICK_STEPS = 1000


@dataclass
class FineTuneConfig(OptimSettings):
    """Fine-tuning on the clean pool. Defaults: BackdoorBench's ``config/defense/ft`` (SGD lr
    0.01, momentum 0.9, weight decay 5e-4, cosine, 100 epochs, batch 256, crop/flip)."""

    steps: int | None = None  # if set: epochs = ceil(steps / steps per epoch), one budget for any pool size
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        self.validate_optim(type(self).__name__.removesuffix("Config").lower())


# The flags of a defense whose config holds these OptimSettings keys (and ``steps``).
TRAINING_FLAGS = (
    Flag("--epochs", "training epochs (replaces the preset's step budget)", int),
    Flag("--steps", "optimiser steps in all, whatever the pool's size", int),
    Flag("--batch-size", "batch size", int),
    Flag("--lr", "learning rate", float),
)


def fine_tune_settings(cfg: FineTuneConfig, n_images: int, **override: Any) -> TrainConfig:
    """The ``TrainConfig`` of ``cfg``'s fine-tuning fields for a pool of ``n_images``: the batch is
    at most the pool, and a ``steps`` budget sets the epochs (the trainer drops a last partial batch)."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if hasattr(cfg, f.name)}
    batch = shared["batch_size"] = max(1, min(cfg.batch_size, n_images))
    if cfg.steps is not None:
        shared["epochs"] = max(1, math.ceil(cfg.steps / max(1, n_images // batch)))
    return TrainConfig(**(shared | override))


@dataclass
class Defended:
    """What :meth:`PostTrainingDefense.defend` returns."""

    model: nn.Module  # the defended model (eval mode)
    history: Any  # history.json: a list of epoch records, or {stage: records}
    seconds: float
    precision: str
    stages: dict[str, dict] | None = None  # metrics.json ``stages`` (measured inside the method)
    extra: dict = field(default_factory=dict)  # metrics.json entries of the method's own (pruned channels, ...)


def measure(model: nn.Module, inputs: DefenseInputs) -> dict | None:
    """The model on the clean / triggered test set, where one is given."""
    return evaluate(model, inputs.test, inputs.attack) if inputs.test is not None else None


class PostTrainingDefense(Defense):
    """A defense of a trained model that uses a clean pool (``needs`` holds ``"model"`` and
    ``"clean_labelled"`` or ``"unlabeled"``). Subclasses set the class attributes and
    implement :meth:`defend`."""

    needs = ("model", "clean_labelled")
    history_stage = "fine-tuning"
    flags = TRAINING_FLAGS
    budget_keys = ("epochs", "steps")
    pool_input: ClassVar[str] = "clean"  # the DefenseInputs field holding the pool
    plan: ClassVar[str] = ""  # describe()'s line: a format string of ``cfg`` and ``n`` (the pool's size)

    def pool(self, inputs: DefenseInputs) -> ImageDataset:
        return getattr(inputs, self.pool_input)

    def pool_size(self, inputs: DefenseInputs) -> int:
        """How many pool images ``inputs`` holds (0 where none is given), for ``describe``."""
        pool = self.pool(inputs)
        return len(pool) if pool is not None else 0

    def describe(self, cfg: Any, inputs: DefenseInputs) -> str:
        return self.plan.format(cfg=cfg, n=self.pool_size(inputs))

    def fine_tune(self, model: nn.Module, inputs: DefenseInputs, cfg: FineTuneConfig, out: Path, resume: bool,
                  checkpoint: str = layout.CHECKPOINT, **fit_args: Any) -> Defended:
        """:func:`~unbackdoor.training.fit.fit` ``model`` on the pool with ``cfg``'s fine-tuning
        settings (checkpoint ``out / checkpoint``); ``fit_args``: its ``desc``, ``objective``, ``sam``, ..."""
        pool = self.pool(inputs)
        res = fit(model, pool, fine_tune_settings(cfg, len(pool)), checkpoint=out / checkpoint, resume=resume,
                  **fit_args)
        return Defended(res.model, res.history, res.seconds, res.precision)

    def defend(self, model: nn.Module, inputs: DefenseInputs, cfg: Any, out: Path, resume: bool) -> Defended:
        """Defend ``model`` (a copy of the suspicious model, free to change); checkpoints go in
        ``out``. Every subclass implements it."""
        raise NotImplementedError

    def run(self, inputs: DefenseInputs, cfg: Any, out_dir: str | os.PathLike, *, resume: bool = False,
            force: bool = False, progress: Progress | None = None) -> DefenseResult:
        self.check(inputs)
        cfg.validate()
        pool = self.pool(inputs)
        kind = "labelled clean" if self.uses_labels else "unlabeled"
        if len(pool) == 0:
            raise EmptyDataset(f"{self.label} needs {kind} images, got 0")
        ctx = current_context()
        was_missing = not os.path.exists(out_dir)
        out = Path(run_on_main(ctx, lambda: prepare_out_dir(out_dir, force=force, resume=resume)))
        n_labelled = len(pool) if self.uses_labels else 0
        with rollback_on_failure(out, was_missing, ctx.is_main and not resume):
            if ctx.is_main:
                write_yaml(out / layout.CONFIG, {"command": self.name, self.name: asdict(cfg), "n_labelled": n_labelled,
                                                 "provenance": inputs.provenance})
            res = self.defend(copy.deepcopy(inputs.model), inputs, cfg, out, resume)
            before, final = measure(inputs.model, inputs), measure(res.model, inputs)
            d = (der(before["clean_accuracy"], before["attack_success_rate"], final["clean_accuracy"],
                     final["attack_success_rate"]) if before and inputs.attack is not None else None)
            metrics = layout.run_metrics(self.name, self.label, final, before=before, stages=res.stages, der=d,
                                         seconds={"total": round(res.seconds, 2)}, n_labelled=n_labelled,
                                         precision=res.precision, **res.extra)
            if ctx.is_main:
                save_model(res.model, out, classes=getattr(inputs.model, "classes", None),
                           provenance={"command": self.name, **inputs.provenance})
                write_json(out / layout.HISTORY, res.history)
                write_json(out / layout.METRICS, metrics)
        ctx.barrier()
        return DefenseResult(res.model, metrics, res)
