"""FT: fine-tuning the suspicious model on a small labelled clean pool (a baseline).

The simplest post-training defense, and the starting point of Fine-Pruning (Liu et
al., RAID 2018), which found fine-tuning alone weakens but often keeps a backdoor.
Settings of BackdoorBench's ``config/defense/ft``: SGD lr 0.01, momentum 0.9, weight
decay 5e-4, cosine schedule, 100 epochs, batch 256, the usual crop (+ flip where the
data allows) augmentation, on 5% of the training set as clean labelled data. It
needs labels, unlike BCU: the experiment gives it the same held-out images BCU uses
unlabeled, with their labels, and ``metrics.json`` records how many (``n_labelled``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field

from unbackdoor.core import layout
from unbackdoor.core.config import require_positive
from unbackdoor.core.errors import EmptyDataset, unknown_name
from unbackdoor.core.files import prepare_out_dir, rollback_on_failure, write_json, write_yaml
from unbackdoor.defenses.base import Defense, DefenseInputs, DefenseResult, Progress, register_defense
from unbackdoor.metrics import der, evaluate
from unbackdoor.models.model_dir import save_model
from unbackdoor.training.distributed import current_context
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import TrainConfig, fit


@dataclass
class FTConfig:
    """FT settings; defaults are BackdoorBench's (module docstring)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = True
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        require_positive("ft", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)


def ft_preset(name: str) -> FTConfig:
    """``paper``: BackdoorBench's settings; ``quick``: 500 images on 2 CPU cores in seconds
    (batch 64, 30 epochs: about the optimiser steps of BCU's quick budget / 20)."""
    if name == "paper":
        return FTConfig()
    if name == "quick":
        return FTConfig(epochs=30, batch_size=64)
    raise unknown_name("preset", name, ("paper", "quick"))


def _measure(model, inputs: DefenseInputs) -> dict | None:
    return evaluate(model, inputs.test, inputs.attack) if inputs.test is not None else None


class FineTuning(Defense):
    name, label, config_type, needs = "ft", "FT", FTConfig, ("model", "clean_labelled")
    preset_of = staticmethod(ft_preset)
    summary = "FT (baseline): fine-tune the suspicious model on a small labelled clean pool"
    description = ("Fine-tuning (the baseline of Fine-Pruning, Liu et al., RAID 2018) with BackdoorBench's "
                   "settings: SGD lr 0.01, momentum 0.9, wd 5e-4, cosine, batch 256, 100 epochs. Needs labelled "
                   "clean images. Writes the model directory at OUT with config.yaml, history.json, checkpoint.pt "
                   "and metrics.json.")
    history_stage = "fine-tuning"

    def describe(self, cfg: FTConfig, inputs: DefenseInputs) -> str:
        n = len(inputs.clean) if inputs.clean is not None else 0
        return f"fine-tune the undefended model {cfg.epochs} epochs on {n} labelled clean images"

    def run(self, inputs: DefenseInputs, cfg: FTConfig, out_dir: str | os.PathLike, *, resume: bool = False,
            force: bool = False, progress: Progress | None = None) -> DefenseResult:
        self.check(inputs)
        cfg.validate()
        if len(inputs.clean) == 0:
            raise EmptyDataset("FT needs labelled clean images, got 0")
        ctx = current_context()
        was_missing = not os.path.exists(out_dir)
        out = prepare_out_dir(out_dir, force=force, resume=resume)
        with rollback_on_failure(out, was_missing, ctx.is_main and not resume):
            write_yaml(out / layout.CONFIG, {"command": self.name, self.name: asdict(cfg) | {"engine": asdict(cfg.engine)},
                                             "n_labelled": len(inputs.clean), "provenance": inputs.provenance})
            model = copy.deepcopy(inputs.model)
            train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=min(cfg.batch_size, len(inputs.clean)), lr=cfg.lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                                    augment=cfg.augment, seed=cfg.seed, engine=cfg.engine)
            res = fit(model, inputs.clean, train_cfg, checkpoint=out / layout.CHECKPOINT, resume=resume,
                      desc="fine-tune")
        before, final = _measure(inputs.model, inputs), _measure(res.model, inputs)
        d = (der(before["clean_accuracy"], before["attack_success_rate"], final["clean_accuracy"],
                 final["attack_success_rate"]) if before and inputs.attack is not None else None)
        metrics = layout.run_metrics(self.name, self.label, final, before=before, der=d,
                                     seconds={"total": round(res.seconds, 2)}, n_labelled=len(inputs.clean),
                                     precision=res.precision)
        if ctx.is_main:
            save_model(res.model, out, classes=getattr(inputs.model, "classes", None),
                       provenance={"command": self.name, **inputs.provenance})
            write_json(out / layout.HISTORY, res.history)
            write_json(out / layout.METRICS, metrics)
        ctx.barrier()
        return DefenseResult(res.model, metrics, res)


register_defense(FineTuning())
