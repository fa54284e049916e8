"""DBD's configuration: the three stages' settings (defaults = the paper's, plus the
robustness additions documented in :mod:`unbackdoor.defenses.dbd`) and the presets."""
from __future__ import annotations

from dataclasses import dataclass, field

from unbackdoor.core.config import require_positive
from unbackdoor.core.errors import UnbackdoorError, unknown_name
from unbackdoor.data.augment import check_grating, check_patches
from unbackdoor.training.engine import EngineOptions
from unbackdoor.training.fit import OptimSettings

GUARDS = ("loss-gap", "none")
BUDGETS = ("plateau", "fixed")
PRESETS = ("paper", "quick")


@dataclass
class SimCLRConfig:
    """Stage 1. Defaults: the paper's CIFAR-10 settings (reference code: 100 epochs
    in the paper's table, batch 512, SGD lr 0.4, momentum 0.9, wd 1e-4, cosine)."""

    epochs: int = 100
    batch_size: int = 512  # source images per step (the model sees 2x as many views)
    optimizer: str = "sgd"
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    temperature: float = 0.5
    projection_dim: int = 128
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    noise: bool = True  # not in the paper: random brightness offset + Gaussian pixel noise per view (dbd/stages.py)
    noise_offset: float = 0.2
    noise_std: float = 0.05
    grating: float = 0.5  # not in the paper: max amplitude of a random grating added to a view (0: off) ...
    grating_p: float = 0.5  # ... with this probability (dbd/stages.py)

    def validate(self) -> None:
        require_positive("simclr", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                  temperature=self.temperature, projection_dim=self.projection_dim)
        if self.batch_size < 2:
            raise UnbackdoorError(f"simclr.batch_size must be >= 2 (NT-Xent needs negatives), got {self.batch_size}")
        check_grating("simclr", self.grating, self.grating_p)


@dataclass
class LinearConfig:
    """Stage 2: the linear head on the frozen backbone (paper: SCE alpha 0.1 / beta 1,
    Adam lr 2e-3, batch 128, 10 epochs; weak augmentation as in the reference).

    ``guard = "loss-gap"`` (default) stops the head early. After every epoch it
    computes each sample's SCE loss (eval mode, no augmentation) and the *loss
    gap*: the mean loss of the highest-loss fraction ``guard_tail`` (the
    confidently "mislabelled" samples) minus the mean loss of the high-credible
    part (lowest ``epsilon``). The gap first widens: the head learns the clean
    classes, so clean losses fall while the poisoned samples, which sit with
    their true class in feature space, become *more* confidently wrong. Once the
    head starts fitting the trigger, the tail's losses fall and the gap
    narrows. Training stops when the gap has not grown (by ``guard_min_delta``,
    relative) for ``guard_patience`` epochs; the head (and BN statistics) of the
    widest-gap epoch are kept. ``epochs`` is then a maximum. The gap also keeps
    the first, under-trained epoch out: there the head still follows the label
    prior, and the target class - inflated by the poisoned samples - has low
    loss for all its members, poisoned ones included.

    On mnist5k the gap was widest before the head fitted the trigger, while the
    paper's 10-epoch heads and the first epoch kept poisoned samples labelled
    (evidence: docs/results_dbd.md, section 1). ``guard = "none"`` trains all
    epochs (reference).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    augment: bool = True  # random crop (pad = side/8) + flip where the data allows it, + gratings
    grating: float = 0.5  # random-grating amplitude (0: off), as in SimCLRConfig
    grating_p: float = 0.5
    guard: str = "loss-gap"
    guard_patience: int = 1
    guard_min_delta: float = 0.0
    guard_tail: float = 0.1  # the high-loss tail whose mean loss the gap starts from
    guard_min_epoch: int = 2  # epochs before it are never kept: epoch 1's head still follows the label prior
    epsilon: float = 0.5  # the high-credible fraction whose mean loss the gap ends at

    def validate(self) -> None:
        require_positive("linear", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, guard_patience=self.guard_patience,
                  guard_min_epoch=self.guard_min_epoch)
        if self.guard not in GUARDS:
            raise unknown_name("stage-2 guard", self.guard, GUARDS)
        _fraction("linear.epsilon", self.epsilon)
        _fraction("linear.guard_tail", self.guard_tail)
        check_grating("linear", self.grating, self.grating_p)


@dataclass
class MixMatchConfig:
    """Stage 3 (paper: epsilon 0.5, 190 epochs x 1024 iterations, batch 64 labelled
    + 64 unlabelled, K = 2, T = 0.5, Beta(0.75), lambda_u = 15 ramped linearly over
    all epochs, Adam lr 2e-3, no lr schedule).

    Three additions decide *which* samples keep their labels, *what* the unlabelled
    ones are guessed as, and *how long* the stage runs (docs/results_dbd.md has the
    evidence; ``balanced: false, class_floor: 0, label_prior: 1, budget: fixed``
    gives the reference):

    * ``balanced`` split: each class keeps its lowest-loss fraction ``epsilon`` of
      ``min(class size, median class size)``. A global loss ranking keeps the easy
      classes and drops hard ones (seen on Fashion-MNIST's coats and shirts), and a
      model fitted on the easy half of every class misses the hard cases; capping
      at the median keeps an inflated (poisoned) class from filling its quota with poisons.
    * ``label_prior``: an unlabelled sample's given label multiplies its share of
      the guess by up to this factor, when the model finds it plausible (at least
      ``label_prior_gate`` times its top class's probability). A poisoned sample's
      given label is implausible to a model that has not learned the trigger, a
      hard clean sample's label usually is. It only acts during the cool-down
      (``budget: plateau``), when the learning rate decays: at full strength
      under a constant rate it fed a backdoor back in (docs/results_dbd.md).
    * ``budget: plateau``: ``epochs`` is a maximum. The learning rate stays
      constant while the model's agreement with the given labels over the whole
      training set keeps rising (by ``plateau_delta`` within ``plateau_patience``
      epochs, checked after the lambda_u ramp); then a cosine cool-down of
      ``cooldown`` times the epochs so far ends the stage. Harder data (lower
      agreement, slower to rise) gets more epochs without a per-dataset setting.
      ``budget: fixed`` runs ``epochs`` at a constant rate (reference).
    * ``min_passes``: an epoch runs ``max(iterations, min_passes x labelled / batch_size)``
      steps, so a larger training set is not cut to a fixed number of steps an epoch
      (the plateau and the cool-down are counted in epochs). Where ``iterations``
      already covers the labelled part (mnist5k's quick preset, the paper's CIFAR-10)
      it changes nothing.
    """

    epochs: int = 190  # budget 'fixed': the epochs; 'plateau': the most epochs before the cool-down
    iterations: int = 1024  # steps per epoch (at least; see min_passes); the split is recomputed before each epoch
    min_passes: float = 1.0  # not in the paper: an epoch is at least this many passes over the labelled part (0: off)
    batch_size: int = 64  # labelled samples per step (and as many unlabelled)
    lr: float = 2e-3
    epsilon: float = 0.7  # kept (labelled) fraction: of each class (balanced) or of all samples (paper: 0.5, global)
    balanced: bool = True  # not in the paper: per-class quota (class docstring)
    class_floor: float = 0.0  # global split only: each class keeps >= this fraction of itself labelled
    label_prior: float = 5.0  # not in the paper: weight of a plausible given label in the guess (1: off)
    label_prior_gate: float = 0.3  # plausible = its probability >= this times the top class's
    budget: str = "plateau"  # plateau | fixed (class docstring)
    plateau_patience: int = 3
    plateau_delta: float = 0.002
    cooldown: float = 1.0  # cool-down epochs as a multiple of the constant-rate epochs
    temperature: float = 0.5  # sharpening
    alpha: float = 0.75  # Beta(alpha, alpha) mixup
    lambda_u: float = 15.0
    rampup_epochs: float | None = None  # None = all epochs (reference)
    sce_alpha: float = 0.1  # the split's SCE loss
    sce_beta: float = 1.0
    augment: bool = True  # random crop (pad = side/8) + flip where the data allows it, + gratings
    grating: float = 0.5  # random-grating amplitude (0: off), as in SimCLRConfig
    grating_p: float = 0.5
    patches: float = 0.5  # not in the paper: probability of random binary patches on an image (0: off; dbd/stages.py)

    def validate(self) -> None:
        require_positive("mixmatch", epochs=self.epochs, iterations=self.iterations, batch_size=self.batch_size,
                  lr=self.lr, temperature=self.temperature, alpha=self.alpha)
        _fraction("mixmatch.epsilon", self.epsilon)
        if not 0.0 <= self.class_floor <= self.epsilon:
            raise UnbackdoorError(f"mixmatch.class_floor must be in [0, epsilon={self.epsilon}], got {self.class_floor}")
        if self.min_passes < 0:
            raise UnbackdoorError(f"mixmatch.min_passes must be >= 0, got {self.min_passes}")
        if self.lambda_u < 0:
            raise UnbackdoorError(f"mixmatch.lambda_u must be >= 0, got {self.lambda_u}")
        if self.label_prior < 1:
            raise UnbackdoorError(f"mixmatch.label_prior must be >= 1 (1: off), got {self.label_prior}")
        if not 0.0 <= self.label_prior_gate <= 1.0:
            raise UnbackdoorError(f"mixmatch.label_prior_gate must be in [0, 1], got {self.label_prior_gate}")
        if self.budget not in BUDGETS:
            raise unknown_name("stage-3 budget", self.budget, BUDGETS)
        require_positive("mixmatch", plateau_patience=self.plateau_patience, cooldown=self.cooldown)
        check_grating("mixmatch", self.grating, self.grating_p)
        check_patches("mixmatch", self.patches)


@dataclass
class PolishConfig(OptimSettings):
    """Not in the paper: after stage 3, supervised fine-tuning (cross-entropy) of the whole
    model on the samples whose given label it trusts (:func:`~unbackdoor.defenses.dbd.split.trusted_labels`:
    in the one class a single-target attack inflates with implausible labels, the ones it
    agrees with that stage 3 kept labelled; elsewhere the plausible ones). MixMatch learns
    the hard clean samples from its own guesses and loses them; their given labels are
    mostly plausible to the defended model, the poisons' labels are not. ``epochs: 0`` turns it off (the paper's DBD). Same augmentation as
    stage 3 (crop, flip, gratings, patches)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    plausible: float = 0.01  # trusted outside the suspect class: p(given) >= this x p(top class)
    suspect_ratio: float = 1.5  # suspect class: implausible fraction >= this x the next class's
    grating: float = 0.5
    grating_p: float = 0.5
    patches: float = 0.5

    def validate(self) -> None:
        if self.epochs == 0:
            return
        self.validate_optim("polish")
        if not 0 < self.plausible <= 1:
            raise UnbackdoorError(f"polish.plausible must be in (0, 1], got {self.plausible}")
        if self.suspect_ratio < 1:
            raise UnbackdoorError(f"polish.suspect_ratio must be >= 1, got {self.suspect_ratio}")
        check_grating("polish", self.grating, self.grating_p)
        check_patches("polish", self.patches)


@dataclass
class DBDConfig:
    """All of DBD. Defaults = the paper's settings plus the robustness additions
    (docstring of defenses/dbd/stages.py). Override from YAML with :func:`unbackdoor.core.config.load_config`."""

    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    mixmatch: MixMatchConfig = field(default_factory=MixMatchConfig)
    polish: PolishConfig = field(default_factory=PolishConfig)
    seed: int = 0
    eval_batch_size: int = 512
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        self.simclr.validate()
        self.linear.validate()
        self.mixmatch.validate()
        self.polish.validate()
        require_positive("dbd", eval_batch_size=self.eval_batch_size)


def dbd_preset(name: str) -> DBDConfig:
    """``paper``: the paper's settings (+ the additions). ``quick``: mnist5k /
    cnn-small on 2 CPU cores in a few minutes (SimCLR 50 epochs at batch 256,
    MixMatch 200 iterations an epoch for at most 40 epochs, the plateau budget
    deciding; docs/results_dbd.md)."""
    if name == "paper":
        return DBDConfig()
    if name == "quick":
        return DBDConfig(
            simclr=SimCLRConfig(epochs=50, batch_size=256),
            linear=LinearConfig(epochs=10),
            mixmatch=MixMatchConfig(epochs=40, iterations=200, rampup_epochs=4),
        )
    raise unknown_name("preset", name, PRESETS)


def _fraction(where: str, v: float) -> None:
    if not 0 < v < 1:
        raise UnbackdoorError(f"{where} must be in (0, 1), got {v}")


