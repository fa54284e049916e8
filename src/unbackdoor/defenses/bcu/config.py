"""BCU's settings (:class:`BCUConfig`), its presets and the paper's per-stage probabilities."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.data.augment import check_grating, check_patches, check_warp
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import OptimSettings

# Paper (ResNet-18): stem conv, stage1..stage4, classifier.
PAPER_STAGE_P: tuple[float, ...] = (0.01, 0.01, 0.03, 0.09, 0.27, 0.10)
STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "classifier")
RULES = ("auto", "stages", "depth")
ABLATIONS = ("none", "no-reinit", "pseudo-label")


@dataclass
class BCUConfig(OptimSettings):
    """BCU settings. Defaults are the paper's (CIFAR-10, ResNet-18): the inherited optimiser
    settings (SGD lr 0.01, momentum 0.9, wd 5e-4, cosine, 100 epochs, batch 256, crop + flip) and
    the method's own."""

    steps: int | None = None  # if set: epochs = ceil(steps / steps per epoch), the same optimiser budget for any pool size
    t_start: float = 1.0  # distillation temperature, ramped linearly per epoch ...
    t_end: float = 4.0  # ... reaching t_end at the last epoch (reference: T_e = 1 + 3 (e+1) / E)
    grating: float = 0.5  # not in the paper: max amplitude of a random grating on the *student's* input (0: off) ...
    grating_p: float = 0.25  # ... with this probability; the teacher always sees the clean image (module docstring)
    patches: float = 0.0  # not in the paper: probability of random binary patches on the student's input (0: off)
    warp: float = 1.0  # not in the paper: strength of a random elastic warp on the student's input (0: off) ...
    warp_p: float = 0.5  # ... with this probability
    rule: str = "auto"  # layer schedule: auto | stages | depth (module docstring)
    stage_p: tuple[float, ...] = PAPER_STAGE_P  # stem, stage1..4, classifier
    p_scale: float = 1.0  # multiplies every rule-derived p (clamped to 1)
    p_overrides: dict[str, float] = field(default_factory=dict)  # module-name glob -> p (last match wins)
    linear_init: str = "kaiming_fan_out"  # fresh Linear values: kaiming_fan_out | default (U(+-1/sqrt(fan_in)))
    ablation: str = "none"  # none | no-reinit (distil an exact copy) | pseudo-label (fine-tune on teacher labels)
    budget: str = "fixed"  # fixed: 'epochs' with 'schedule'; plateau: teacher/student agreement decides (module docstring)
    max_epochs: int = 500  # budget 'plateau': the most epochs before the cool-down
    plateau_patience: int = 10
    plateau_delta: float = 0.002
    cooldown: float = 0.3  # cool-down epochs as a multiple of the constant-rate epochs
    eval_every: int = 5  # epochs between BA/ASR evaluations in the history (when test data is given)
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        self.validate_optim("bcu")
        if self.t_start <= 0 or self.t_end <= 0:
            raise UnbackdoorError(f"bcu temperatures must be > 0, got {self.t_start} -> {self.t_end}")
        if self.rule not in RULES:
            raise unknown_name("layer-schedule rule", self.rule, RULES)
        if self.ablation not in ABLATIONS:
            raise unknown_name("ablation", self.ablation, ABLATIONS)
        if len(self.stage_p) != len(STAGE_NAMES) or not all(0.0 <= p <= 1.0 for p in self.stage_p):
            raise UnbackdoorError(f"bcu.stage_p must be {len(STAGE_NAMES)} probabilities in [0, 1] "
                                  f"({', '.join(STAGE_NAMES)}), got {list(self.stage_p)}")
        if self.p_scale < 0:
            raise UnbackdoorError(f"bcu.p_scale must be >= 0, got {self.p_scale}")
        for pat, p in self.p_overrides.items():
            if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
                raise UnbackdoorError(f"bcu.p_overrides[{pat!r}] must be a probability in [0, 1], got {p!r}")
        if self.linear_init not in ("kaiming_fan_out", "default"):
            raise unknown_name("linear_init", self.linear_init, ("kaiming_fan_out", "default"))
        if self.eval_every < 1:
            raise UnbackdoorError(f"bcu.eval_every must be >= 1, got {self.eval_every}")
        check_grating("bcu", self.grating, self.grating_p)
        check_patches("bcu", self.patches)
        check_warp("bcu", self.warp, self.warp_p)


PRESETS = ("paper", "quick")


def bcu_preset(name: str) -> BCUConfig:
    """``paper``: the paper's settings. ``quick``: mnist5k / cnn-small on 2 CPU cores
    (chosen by measurement, docs/results_bcu.md)."""
    if name == "paper":
        return BCUConfig()
    if name == "quick":
        # Doubled depth-rule doses and a budget in optimiser steps, whatever the pool's
        # size: the evidence is in docs/results_bcu.md.
        return BCUConfig(steps=4800, batch_size=32, p_scale=2.0)
    raise unknown_name("preset", name, PRESETS)



def resolve_epochs(cfg: BCUConfig, n_unlabeled: int) -> BCUConfig:
    """``cfg`` with ``epochs`` derived from ``steps`` for a pool of ``n_unlabeled`` images (unchanged without ``steps``)."""
    if cfg.steps is None:
        return cfg
    per_epoch = max(1, math.ceil(n_unlabeled / cfg.batch_size))
    return replace(cfg, epochs=max(1, math.ceil(cfg.steps / per_epoch)))


def temperature_at(epoch: int, cfg: BCUConfig) -> float:
    """Temperature of (0-based) ``epoch``: linear from t_start to t_end, reaching t_end at
    epoch ``cfg.epochs`` (the last one of a fixed budget) and staying there after it."""
    return cfg.t_start + (cfg.t_end - cfg.t_start) * min(1.0, (epoch + 1) / cfg.epochs)
