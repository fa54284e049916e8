"""What one experiment runs (:class:`ExperimentSpec`), how its attacked model is
trained, and the YAML file that overrides the presets of its stages."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unbackdoor.attacks.base import attack_class, attack_names
from unbackdoor.core.config import load_config
from unbackdoor.core.errors import NeedsLocalFiles, UnbackdoorError, unknown_name
from unbackdoor.core.files import read_yaml
from unbackdoor.data.loaders import dataset_info, dataset_names
from unbackdoor.defenses import defense_names, defenses, get_defense
from unbackdoor.training.fit import TrainConfig

PRESETS = ("quick", "paper")


def default_defenses() -> tuple[str, ...]:
    """What ``demo`` and ``sweep`` run unless told otherwise: the featured defenses."""
    return tuple(d.name for d in defenses() if getattr(d, "featured", False))


def parse_defenses(names: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"a,b"`` / a sequence / ``"all"`` / None (the featured ones) -> registered defense names."""
    if names is None:
        return default_defenses()
    if isinstance(names, str):
        names = [x.strip() for x in names.split(",") if x.strip()]
    if list(names) == ["all"]:
        return tuple(defense_names())
    for n in names:
        get_defense(n)  # clear error for an unknown name
    return tuple(names)


@dataclass
class ExperimentSpec:
    """What one experiment runs. ``preset`` selects the defenses' settings
    (``quick``: mnist5k / cnn-small on 2 CPU cores; ``paper``: the papers' settings)."""

    attack: str = "badnets"
    dataset: str = "mnist5k"
    defenses: tuple[str, ...] | None = None  # None: the featured defenses
    preset: str = "quick"
    seed: int = 0
    rate: float = 0.1
    target: int = 0
    model: str | None = None  # None: the dataset's default (cnn-small for digits, resnet18 for CIFAR / GTSRB)
    root: str | None = None  # local files for cifar10 / gtsrb / ...
    params: dict[str, Any] = field(default_factory=dict)  # attack parameters

    def __post_init__(self) -> None:
        if self.defenses is None:
            self.defenses = default_defenses()

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        return dataset_info(self.dataset).default_model if self.dataset in dataset_names() else "cnn-small"

    def validate(self) -> None:
        if self.dataset in dataset_names():
            if dataset_info(self.dataset).needs_root and not self.root:
                raise NeedsLocalFiles(f"dataset {self.dataset!r} is read from local files and no folder was given")
        elif not Path(self.dataset).exists():
            raise unknown_name("dataset", self.dataset, dataset_names())
        if self.preset not in PRESETS:
            raise unknown_name("preset", self.preset, PRESETS)
        self.defenses = parse_defenses(self.defenses)
        if self.attack not in attack_names():
            raise unknown_name("attack", self.attack, attack_names())

    def key(self) -> dict:
        """The settings a finished stage depends on (``defenses`` may grow between runs)."""
        d = asdict(self)
        d.pop("defenses")
        d["model"] = self.model_name
        return d


# The attacked model trains for at least this many SGD steps (batch 64): long enough
# to reach what its architecture can on a small training set (docs/results_dbd.md).
ATTACKED_MODEL_STEPS = 4000


def train_config(spec: ExperimentSpec, engine, n_train: int) -> TrainConfig:
    """How the attacked model is trained: the same under both presets (it is the thing
    attacked, not a method under test), long enough to reach what the architecture can
    (a fair undefended reference), and for as many epochs as the attack needs to take."""
    base = TrainConfig()
    epochs = max(base.epochs, attack_class(spec.attack).train_epochs,
                 math.ceil(ATTACKED_MODEL_STEPS / max(1, n_train // base.batch_size)))
    return TrainConfig(epochs=epochs, seed=spec.seed, engine=engine)


def load_experiment_configs(path: str | os.PathLike | None, preset: str = "quick") -> dict[str, Any]:
    """Read a YAML file with optional ``train:`` and per-defense sections (``dbd:``, ...);
    each overrides that stage's settings (a defense's on top of its preset)."""
    if path is None:
        return {}
    data = read_yaml(path)
    valid = ["train", *defense_names()]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise UnbackdoorError(f"{path}: unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(valid)}")
    out: dict[str, Any] = {}
    if "train" in data:
        out["train"] = load_config(TrainConfig(), path, "train")
    for name in data:
        if name != "train":
            out[name] = get_defense(name).load_config(preset, path)
    return out
