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

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from unbackdoor.core.errors import unknown_name
from unbackdoor.defenses.base import DefenseInputs, register_defense
from unbackdoor.defenses.posttrain import QUICK_STEPS, Defended, FineTuneConfig, PostTrainingDefense


@dataclass
class FTConfig(FineTuneConfig):
    """FT settings; defaults are BackdoorBench's (module docstring)."""


def ft_preset(name: str) -> FTConfig:
    """``paper``: BackdoorBench's settings; ``quick``: its 1,000 optimiser steps at batch 64
    (:data:`~unbackdoor.defenses.posttrain.QUICK_STEPS`), whatever the pool size."""
    if name == "paper":
        return FTConfig()
    if name == "quick":
        return FTConfig(steps=QUICK_STEPS, batch_size=64)
    raise unknown_name("preset", name, ("paper", "quick"))


class FineTuning(PostTrainingDefense):
    """Fine-tuning (the baseline of Fine-Pruning, Liu et al., RAID 2018) with BackdoorBench's settings: SGD lr
    0.01, momentum 0.9, wd 5e-4, cosine, batch 256, 100 epochs. Needs labelled clean images. Writes the
    model directory at OUT with config.yaml, history.json, checkpoint.pt and metrics.json."""

    name, label, config_type = "ft", "FT", FTConfig
    preset_of = staticmethod(ft_preset)
    summary = "FT (baseline): fine-tune the suspicious model on a small labelled clean pool"
    plan = "fine-tune the undefended model {cfg.budget} on {n} labelled clean images"

    def defend(self, model: nn.Module, inputs: DefenseInputs, cfg: FTConfig, out: Path, resume: bool) -> Defended:
        return self.fine_tune(model, inputs, cfg, out, resume, desc="fine-tune")


register_defense(FineTuning())
