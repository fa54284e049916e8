"""The attack interface and registry.

An :class:`Attack` is built for one image shape and label space. Its one verb
for test time is :meth:`Attack.apply` (add the trigger to a float batch); for
training data it is :meth:`Attack.poison` (returns the poisoned dataset and the
boolean poison mask). Attacks are serialised as a JSON spec plus a small
safetensors file of their tensors (trigger pattern, warping grid), so a
poisoned-data folder fully describes its attack.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import atomic_path, read_json, write_json
from unbackdoor.core.registry import Registry
from unbackdoor.data.augment import to_float, to_uint8
from unbackdoor.data.dataset import ImageDataset

MODES = ("all-to-one", "all-to-all")
_ATTACKS: Registry[type["Attack"]] = Registry("attack")


def register(cls: type["Attack"]) -> type["Attack"]:
    _ATTACKS.add(cls.name, cls, replace=True)
    return cls


def attack_names() -> list[str]:
    return sorted(_ATTACKS.names())


def attack_class(name: str) -> type["Attack"]:
    """The registered attack class of ``name`` (clear error listing the valid names)."""
    return _ATTACKS.get(name)


class Attack:
    """Base class. Subclasses set ``name``, optionally ``clean_label`` and implement
    :meth:`apply` (and :meth:`poison_images` when training-time poisoning differs
    from the test-time trigger)."""

    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False
    # Epochs the attacked model needs for the backdoor to take on mnist5k / cnn-small
    # (evidence: README, Attacks); the demo and sweep train at least this long.
    train_epochs: ClassVar[int] = 12

    def __init__(self, shape: tuple[int, int, int], num_classes: int, target: int = 0, mode: str = "all-to-one", seed: int = 0):
        if mode not in MODES:
            raise UnbackdoorError(f"unknown attack mode {mode!r}; valid modes: {', '.join(MODES)}")
        if not 0 <= int(target) < num_classes:
            raise UnbackdoorError(f"target label {target} is outside the classes [0, {num_classes - 1}]")
        if self.clean_label and mode != "all-to-one":
            raise UnbackdoorError(f"{self.name} is a clean-label attack and supports only all-to-one")
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.target = int(target)
        self.mode = mode
        self.seed = int(seed)

    # ------------------------------------------------------------------ trigger
    def apply(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Add the test-time trigger. x: float (N, C, H, W) in [0, 1] -> same shape/range."""
        raise NotImplementedError

    def apply_uint8(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Trigger uint8 (N, C, H, W) images; the result is rounded back to uint8,
        exactly as poisoned training images are stored."""
        out = [to_uint8(self.apply(to_float(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else images.clone()

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for an input of true label ``labels``."""
        if self.mode == "all-to-all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.target)

    def asr_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Which test images count for ASR / robust accuracy (docs/design.md): all-to-one
        excludes images whose true label is the target."""
        if self.mode == "all-to-all":
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != self.target

    # ------------------------------------------------------------------ poisoning
    def poison_images(self, images: torch.Tensor, labels: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
        """Training-time poisoning of the chosen uint8 images (default: the test trigger)."""
        return self.apply_uint8(images)

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        if self.clean_label:
            return labels == self.target
        if self.mode == "all-to-all":
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != self.target

    def poison(self, dataset: ImageDataset, rate: float, seed: int = 0) -> tuple[ImageDataset, torch.Tensor]:
        """Poison a fraction ``rate`` of ``dataset`` (of the whole set, as in BackdoorBench).

        Dirty-label attacks pick among non-target samples and relabel them;
        clean-label attacks pick among target-class samples and keep labels
        (capped at the number of target samples). Returns the new dataset and
        the bool poison mask (N,).
        """
        check_rate(rate)
        self._check_dataset(dataset)
        gen = np.random.default_rng(seed)
        elig = np.flatnonzero(self.eligible(dataset.labels).numpy())
        n = int(round(rate * len(dataset)))
        if self.clean_label and n >= len(elig):
            # Every target-class sample carries the trigger: the model never sees a clean
            # one and learns the trigger as the class (evidence: README, Attacks, footnote 2).
            warnings.warn(f"{self.name}: rate {rate} asks for {n} samples and poisons all {len(elig)} "
                          f"target-class samples; no clean target-class image is left, so clean accuracy "
                          f"on the target class may suffer (use a lower rate)", stacklevel=2)
            n = len(elig)
        if n > len(elig):
            raise UnbackdoorError(f"rate {rate} asks for {n} poisoned samples but only {len(elig)} are eligible")
        if n == 0:
            raise UnbackdoorError(f"rate {rate} poisons no sample of {len(dataset)}")
        idx = torch.as_tensor(np.sort(gen.choice(elig, size=n, replace=False)))
        images = dataset.images.clone()
        labels = dataset.labels.clone()
        images[idx] = self.poison_images(dataset.images[idx], dataset.labels[idx], dataset)
        if not self.clean_label:
            labels[idx] = self.target_labels(dataset.labels[idx])
        mask = torch.zeros(len(dataset), dtype=torch.bool)
        mask[idx] = True
        out = replace(dataset, images=images, labels=labels, poisoned=mask, true_labels=dataset.labels.clone(),
                      meta={**dataset.meta, "attack": self.name})
        self._extra_poison(out, mask, gen)
        return out, mask

    def _extra_poison(self, ds: ImageDataset, mask: torch.Tensor, gen: np.random.Generator) -> None:
        """Hook for attacks that also modify non-poisoned samples (WaNet's noise mode)."""

    def _check_dataset(self, ds: ImageDataset) -> None:
        if ds.shape != self.shape:
            raise UnbackdoorError(f"attack was built for images {self.shape}, dataset has {ds.shape}")
        if ds.num_classes != self.num_classes:
            raise UnbackdoorError(f"attack was built for {self.num_classes} classes, dataset has {ds.num_classes}")

    # ------------------------------------------------------------------ serialisation
    def params(self) -> dict[str, Any]:
        """JSON-able attack-specific parameters (constructor keywords)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors needed to re-create the exact trigger (pattern, grid)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            setattr(self, k, v)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name, "target": self.target, "mode": self.mode, "seed": self.seed,
            "shape": list(self.shape), "num_classes": self.num_classes, "clean_label": self.clean_label,
            "params": self.params(),
        }

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        write_json(folder / "attack.json", self.spec())
        t = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        if t:
            with atomic_path(folder / "attack.safetensors") as tmp:
                save_file(t, str(tmp))


def check_rate(rate: float) -> None:
    if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise UnbackdoorError(f"poisoning rate must be in (0, 1], got {rate}")


def make_attack(name: str, shape: tuple[int, int, int], num_classes: int, target: int = 0, mode: str = "all-to-one",
                seed: int = 0, **params: Any) -> Attack:
    """Build an attack by registry name for images of ``shape`` (C, H, W)."""
    cls = attack_class(name)
    try:
        return cls(shape, num_classes, target=target, mode=mode, seed=seed, **params)
    except TypeError as e:
        raise UnbackdoorError(f"bad parameters for attack {name!r}: {e}") from None


def load_attack(folder: str | os.PathLike) -> Attack:
    """Re-create the exact attack saved in ``folder`` (attack.json + attack.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_json(folder / "attack.json")
    tfile = folder / "attack.safetensors"
    params = dict(spec.get("params", {}))
    if tfile.exists() and spec.get("name") in ("blended", "custom"):
        params["_restoring"] = True  # the trigger comes from the saved tensors, not the original files
    try:
        atk = make_attack(spec["name"], tuple(spec["shape"]), spec["num_classes"], spec["target"], spec["mode"],
                          spec.get("seed", 0), **params)
    except KeyError as e:
        raise UnbackdoorError(f"{folder / 'attack.json'} lacks key {e}") from None
    if tfile.exists():
        try:
            atk.load_tensors(load_file(str(tfile)))
        except Exception as e:  # noqa: BLE001
            raise UnbackdoorError(f"corrupted attack file {tfile}: {e}") from None
    return atk
