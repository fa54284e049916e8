"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Zha, Wu; ICCV 2023,
"Enhancing fine-tuning based backdoor defense with sharpness-aware minimization"), a
baseline that uses a small labelled clean pool.

The suspicious model is fine-tuned on the clean pool with adaptive SAM steps
(:mod:`unbackdoor.training.sam`): the larger loss in a neighbourhood of the weights
is minimised, which moves the weights the backdoor depends on (the paper finds they
have large norms) further than plain fine-tuning does.

Settings of BackdoorBench's ``config/defense/ft-sam`` and ``defense/ft-sam.py``: SGD lr
0.01, momentum 0.9, weight decay 5e-4, cosine, 100 epochs, batch 256, adaptive SAM
(ASAM; its ``--adaptive`` flag defaults to on) with rho 2.0 (``rho_max = rho_min``: a
constant radius), label smoothing 0.1, no gradient decomposition (``alpha: 0``), on 5%
of the training set. A SAM step costs two forward/backward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.defenses.base import DefenseInputs, register_defense
from unbackdoor.defenses.posttrain import QUICK_STEPS, Defended, FineTuneConfig, PostTrainingDefense
from unbackdoor.training.sam import SAMSettings


@dataclass
class FTSAMConfig(FineTuneConfig):
    """FT-SAM settings: fine-tuning (inherited fields) plus SAM's; defaults are BackdoorBench's."""

    rho: float = 2.0
    adaptive: bool = True
    label_smoothing: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.rho <= 0:
            raise UnbackdoorError(f"ft-sam.rho must be > 0, got {self.rho}")
        if not 0 <= self.label_smoothing < 1:
            raise UnbackdoorError(f"ft-sam.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def ft_sam_preset(name: str) -> FTSAMConfig:
    """``paper``: BackdoorBench's settings; ``quick``: FT's quick budget (1,000 optimiser steps at
    batch 64; each SAM step costs two passes)."""
    if name == "paper":
        return FTSAMConfig()
    if name == "quick":
        return FTSAMConfig(steps=QUICK_STEPS, batch_size=64)
    raise unknown_name("preset", name, ("paper", "quick"))


def smoothed_cross_entropy(smoothing: float):
    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        return F.cross_entropy(out.float(), y, label_smoothing=smoothing), out
    return objective


class FTSAM(PostTrainingDefense):
    """FT-SAM (Zhu et al., ICCV 2023) with BackdoorBench's settings: fine-tuning with adaptive SAM (rho 2.0),
    label smoothing 0.1, SGD lr 0.01, momentum 0.9, wd 5e-4, cosine, 100 epochs, batch 256. Needs labelled
    clean images. Writes the model directory at OUT with config.yaml, history.json, checkpoint.pt and
    metrics.json."""

    name, label, config_type = "ft-sam", "FT-SAM", FTSAMConfig
    preset_of = staticmethod(ft_sam_preset)
    summary = "FT-SAM (baseline): fine-tune with sharpness-aware minimisation on a labelled clean pool"

    def describe(self, cfg: FTSAMConfig, inputs: DefenseInputs) -> str:
        sam = f"{'adaptive ' if cfg.adaptive else ''}SAM (rho {cfg.rho})"
        return f"fine-tune with {sam} {cfg.budget} on {self.pool_size(inputs)} labelled clean images"

    def defend(self, model: nn.Module, inputs: DefenseInputs, cfg: FTSAMConfig, out: Path, resume: bool) -> Defended:
        return self.fine_tune(model, inputs, cfg, out, resume, desc="FT-SAM",
                              objective=smoothed_cross_entropy(cfg.label_smoothing),
                              sam=SAMSettings(cfg.rho, cfg.adaptive), settings={"label_smoothing": cfg.label_smoothing})


register_defense(FTSAM())
