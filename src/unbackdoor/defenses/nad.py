"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma; ICLR 2021), a baseline
that uses a small labelled clean pool.

1. The teacher: a copy of the suspicious model fine-tuned on the clean pool
   (``teacher_epochs``; BackdoorBench ``te_epochs: 10``).
2. The student: the suspicious model itself, fine-tuned on the clean pool with
   cross-entropy plus attention distillation towards the teacher at three depths:
   ``sum_i beta_i * MSE(A(s_i), A(t_i))``, where the attention map of a feature map
   ``f`` (N, C, H, W) is ``A(f) = sum_c |f_c|^p`` flattened per image and divided by
   its L2 norm (``p = 2``; betas 500, 1000, 1000 from shallow to deep).

Settings of the authors' code (github.com/bboylyg/NAD, ``config.py`` / ``utils.adjust_learning_rate``;
the teacher is the same training with the betas at 0, "5~10 epochs"): SGD lr 0.1 for the
first tenth of training, then 0.01 (schedule ``drop``), momentum 0.9, weight decay 1e-4,
batch 64, 20 student epochs, 10 teacher epochs, betas (500, 1000, 1000), p 2, on 5% of
the training set. BackdoorBench's ``config/defense/nad`` keeps the betas and p but
fine-tunes at lr 0.01 with a cosine schedule for 100 epochs (batch 256, wd 5e-4); at that
lr the teacher, plain fine-tuning, keeps the backdoor on our data (docs/results_baselines.md),
and so does the student distilled from it.

Where the maps are taken (:func:`attention_layers`): a ResNet's ``layer2``, ``layer3``,
``layer4`` outputs (BackdoorBench's choice for PreAct-ResNet-18); for a model whose
backbone is a plain sequence of conv blocks (cnn-small), the output of each block's
max-pool; otherwise the last three ``Conv2d`` layers.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.defenses.base import DefenseInputs, register_defense
from unbackdoor.defenses.posttrain import QUICK_STEPS, Defended, FineTuneConfig, PostTrainingDefense, measure

TEACHER_CHECKPOINT = "teacher.pt"
STUDENT_CHECKPOINT = "checkpoint.pt"


@dataclass
class NADConfig(FineTuneConfig):
    """NAD settings: the student's fine-tuning (inherited fields) plus the teacher's length and
    the distillation weights; defaults are the authors' (module docstring)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 1e-4
    schedule: str = "drop"
    teacher_epochs: int = 10
    teacher_steps: int | None = None  # if set: the teacher's budget in optimiser steps (as ``steps``)
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)  # shallow -> deep
    p: float = 2.0

    def validate(self) -> None:
        super().validate()
        if self.teacher_epochs < 1 or (self.teacher_steps is not None and self.teacher_steps < 1):
            raise UnbackdoorError(f"nad.teacher_epochs / teacher_steps must be >= 1, got {self.teacher_epochs} / "
                                  f"{self.teacher_steps}")
        if not self.betas or any(b < 0 for b in self.betas):
            raise UnbackdoorError(f"nad.betas must be one or more weights >= 0, got {self.betas}")
        if self.p <= 0:
            raise UnbackdoorError(f"nad.p must be > 0, got {self.p}")


def nad_preset(name: str) -> NADConfig:
    """``paper``: the authors' settings; ``quick``: FT's quick budget for the student (1,000
    optimiser steps at batch 64) and half of it for the teacher (the authors' 10 vs 20 epochs)."""
    if name == "paper":
        return NADConfig()
    if name == "quick":
        return NADConfig(steps=QUICK_STEPS, teacher_steps=QUICK_STEPS // 2)
    raise unknown_name("preset", name, ("paper", "quick"))


def teacher_settings(cfg: NADConfig) -> NADConfig:
    """The teacher's fine-tuning: the student's settings with the teacher's length."""
    return replace(cfg, epochs=cfg.teacher_epochs, steps=cfg.teacher_steps)


def attention_layers(model: nn.Module, n: int = 3) -> list[nn.Module]:
    """The modules whose outputs NAD compares, shallow to deep (module docstring)."""
    bb = getattr(model, "backbone", model)
    if all(hasattr(bb, f"layer{i}") for i in (2, 3, 4)):
        return [bb.layer2, bb.layer3, bb.layer4][-n:]
    pools = [m for m in bb.modules() if isinstance(m, nn.MaxPool2d)] if isinstance(bb, nn.Sequential) else []
    layers = pools or [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise UnbackdoorError("NAD needs a convolutional model: no feature maps to take attention from")
    return layers[-n:]


def attention_map(f: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """``sum_c |f_c|^p`` per position, flattened per image, divided by its L2 norm (fp32)."""
    am = f.float().abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


class _Taps:
    """Forward hooks keeping the outputs of ``layers`` from the last forward pass."""

    def __init__(self, layers: list[nn.Module]):
        self.out: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [m.register_forward_hook(self._keep(i)) for i, m in enumerate(layers)]

    def _keep(self, i: int) -> Callable:
        def hook(_module, _inp, output):
            self.out[i] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def nad_objective(teacher: nn.Module, student_taps: _Taps, teacher_taps: _Taps, cfg: NADConfig):
    """The student's loss: cross-entropy + the weighted attention distances to the teacher."""
    betas = list(cfg.betas)[-len(student_taps.out):]

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        with torch.no_grad():
            teacher(x)
        loss = F.cross_entropy(out.float(), y)
        for b, s, t in zip(betas, student_taps.out, teacher_taps.out):
            loss = loss + b * F.mse_loss(attention_map(s, cfg.p), attention_map(t, cfg.p))
        return loss, out

    return objective


class NAD(PostTrainingDefense):
    """Neural Attention Distillation (Li et al., ICLR 2021) with the authors' settings: a teacher fine-tuned 10
    epochs on labelled clean images, then the suspicious model fine-tuned 20 epochs with cross-entropy +
    attention-map distillation at three depths (betas 500/1000/1000, p 2; SGD lr 0.1 then 0.01, batch 64).
    Needs labelled clean images. Writes the model directory at OUT with config.yaml, history.json (teacher,
    student), teacher.pt, checkpoint.pt and metrics.json."""

    name, label, config_type = "nad", "NAD", NADConfig
    preset_of = staticmethod(nad_preset)
    summary = "NAD (baseline): attention distillation from a fine-tuned teacher, on a labelled clean pool"

    def describe(self, cfg: NADConfig, inputs: DefenseInputs) -> str:
        return (f"teacher {teacher_settings(cfg).budget}, then attention distillation {cfg.budget} on "
                f"{self.pool_size(inputs)} labelled clean images")

    def defend(self, model: nn.Module, inputs: DefenseInputs, cfg: NADConfig, out: Path, resume: bool) -> Defended:
        t0 = time.perf_counter()
        teacher = self.fine_tune(copy.deepcopy(model), inputs, teacher_settings(cfg), out, resume,
                                 checkpoint=TEACHER_CHECKPOINT, desc="NAD teacher")
        teacher.model.eval().requires_grad_(False)
        s_taps, t_taps = _Taps(attention_layers(model)), _Taps(attention_layers(teacher.model))
        try:
            student = self.fine_tune(model, inputs, cfg, out, resume, checkpoint=STUDENT_CHECKPOINT,
                                     desc="NAD student", objective=nad_objective(teacher.model, s_taps, t_taps, cfg),
                                     settings={"nad": {"teacher_epochs": cfg.teacher_epochs,
                                                       "teacher_steps": cfg.teacher_steps, "betas": list(cfg.betas),
                                                       "p": cfg.p}})
        finally:
            s_taps.remove()
            t_taps.remove()
        teacher_m = measure(teacher.model, inputs)
        return Defended(student.model, {"teacher": teacher.history, "student": student.history},
                        time.perf_counter() - t0, student.precision,
                        stages={"teacher": teacher_m} if teacher_m else None)


register_defense(NAD())
