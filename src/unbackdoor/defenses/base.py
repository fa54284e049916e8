"""The defense interface and registry.

A defense is one module (or small package) that subclasses :class:`Defense` and
registers an instance with :func:`register_defense`. It declares

- ``name`` (CLI subcommand, experiment folder, ``--defenses`` entry) and ``label``;
- ``config_type`` and its presets (``preset("paper" | "quick")``);
- ``needs``: which of :data:`INPUTS` it reads;
- optionally ``flags`` (:class:`Flag`: its own command-line flags, each setting a
  config key) and ``budget_keys`` (a length in epochs replaces a step budget);
- ``run(inputs, cfg, out_dir, ...)`` returning a :class:`DefenseResult` whose
  ``metrics`` follow :func:`unbackdoor.core.layout.run_metrics` and were written to
  ``out_dir/metrics.json`` (with the model directory and whatever else it keeps).

The CLI (``unbackdoor <name>``), the experiment and sweep, the leaderboard and
the report loop over :func:`defenses`; nothing else names a defense.
docs/adding_a_defense.md walks through a new one.
"""
from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from unbackdoor.core.config import load_config, override
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import read_yaml
from unbackdoor.core.registry import Registry
from unbackdoor.data.dataset import ImageDataset

# What a defense may need, and how the CLI and the experiment provide it.
INPUTS = {
    "train_set": "a labelled training set, possibly poisoned (it trains a model from scratch)",
    "model": "a suspicious trained model",
    "unlabeled": "unlabeled images (labels, where present, are ignored)",
    "clean_labelled": "a small labelled clean pool",
}

Progress = Callable[[float, str], None]  # (fraction of the defense's work done, a short note)


@dataclass
class DefenseInputs:
    """What a defense runs on; each field is filled where the defense ``needs`` it."""

    train: ImageDataset | None = None  # labelled training set, possibly poisoned (``poisoned`` mask where known)
    arch: str | None = None  # architecture a training-time defense builds (a registry model name)
    model: nn.Module | None = None  # the suspicious model of a post-training defense (not modified)
    unlabeled: ImageDataset | None = None
    clean: ImageDataset | None = None  # labelled clean images
    test: ImageDataset | None = None  # clean labelled test set: measures ``before`` / ``final``
    attack: Any = None  # the attack (an ``Attack``), to measure ASR and robust accuracy
    provenance: dict = field(default_factory=dict)  # where the inputs came from (written to config.yaml)


@dataclass(frozen=True)
class Flag:
    """A command-line flag of a defense's own, setting one key of its config."""

    flag: str  # e.g. "--size-threshold"
    help: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    key: str | None = None  # the config key ("retrain.lr": nested); default: the flag's name with '_'

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def config_key(self) -> str:
        return self.key or self.dest


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the shape :func:`~unbackdoor.core.config.override` takes)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def _has_key(data: dict, dotted: str) -> bool:
    for k in dotted.split("."):
        if not isinstance(data, dict) or k not in data:
            return False
        data = data[k]
    return True


@dataclass
class DefenseResult:
    model: nn.Module  # the defended classifier, eval mode
    metrics: dict  # what the run wrote to metrics.json
    details: Any = None  # the defense's own result object


class Defense:
    """Base class of a defense; subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    label: ClassVar[str]
    config_type: ClassVar[type]
    needs: ClassVar[tuple[str, ...]]
    summary: ClassVar[str] = ""  # one line for ``unbackdoor --help``; the class docstring is NAME --help's paragraph
    presets: ClassVar[tuple[str, ...]] = ("paper", "quick")
    history_stage: ClassVar[str] = "training"  # what a flat history.json of this defense records
    featured: ClassVar[bool] = False  # run by demo and sweep unless told otherwise

    preset_of: ClassVar[Callable[[str], Any]]  # preset name -> settings (set with staticmethod(...))
    flags: ClassVar[tuple[Flag, ...]] = ()  # its own command-line flags
    # (epochs key, steps key): a length in epochs given without steps (YAML or flags) replaces a preset's step budget
    budget_keys: ClassVar[tuple[str, str] | None] = None

    @property
    def description(self) -> str:
        """The paragraph of ``unbackdoor NAME --help``: the class docstring."""
        return inspect.cleandoc(type(self).__doc__ or "")

    def preset(self, name: str) -> Any:
        """The settings of preset ``name`` (an instance of ``config_type``)."""
        return type(self).preset_of(name)

    def load_config(self, preset: str, path: str | os.PathLike | None) -> Any:
        """Preset ``preset`` with a YAML file's overrides (its keys, or its section named after
        this defense)."""
        cfg = load_config(self.preset(preset), path, section=self.name)
        if path is not None and self.budget_keys is not None:
            data = read_yaml(path)
            data = data[self.name] if isinstance(data.get(self.name), dict) else data
            epochs, steps = self.budget_keys
            if _has_key(data, epochs) and not _has_key(data, steps):
                cfg = override(cfg, nest({steps: None}), where=self.name)
        return cfg

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this defense's own (beyond inputs, --preset, --config, --seed, engine):
        :attr:`flags`."""
        for f in self.flags:
            parser.add_argument(f.flag, type=f.type, choices=f.choices, help=f.help)

    def configure(self, cfg: Any, args: argparse.Namespace) -> Any:
        """``cfg`` with the flags of :meth:`add_arguments` that were given applied."""
        given = {f.config_key: getattr(args, f.dest) for f in self.flags if getattr(args, f.dest, None) is not None}
        if self.budget_keys is not None and self.budget_keys[0] in given and self.budget_keys[1] not in given:
            given[self.budget_keys[1]] = None
        return override(cfg, nest(given), where=self.name) if given else cfg

    def describe(self, cfg: Any, inputs: DefenseInputs) -> str:
        """One line saying what a run with ``cfg`` will do (the experiment's display)."""
        return ""

    def run(self, inputs: DefenseInputs, cfg: Any, out_dir: str | os.PathLike, *, resume: bool = False,
            force: bool = False, progress: Progress | None = None) -> DefenseResult:
        """Run the defense and write ``out_dir`` (model directory, metrics.json last). Every
        subclass implements it; the base class has no defense of its own to run."""
        raise NotImplementedError

    @property
    def uses_labels(self) -> bool:
        return "clean_labelled" in self.needs

    def check(self, inputs: DefenseInputs) -> None:
        """A clear error when an input this defense needs is missing or empty."""
        have = {"train_set": inputs.train, "model": inputs.model, "unlabeled": inputs.unlabeled,
                "clean_labelled": inputs.clean}
        for need in self.needs:
            if need not in INPUTS:
                raise ValueError(f"defense {self.name!r} needs unknown input {need!r}")
            if have[need] is None:
                raise UnbackdoorError(f"{self.label} needs {INPUTS[need]}, and none was given")
        if "train_set" in self.needs and inputs.arch is None and inputs.model is None:
            raise UnbackdoorError(f"{self.label} trains a model: name its architecture")


_DEFENSES: Registry[Defense] = Registry("defense")
_PLUGINS_LOADED = False


def register_defense(defense: Defense, *, replace: bool = False) -> Defense:
    """Make ``defense`` known to the CLI, experiments, sweeps and reports."""
    for attr in ("name", "label", "config_type", "needs"):
        if not hasattr(defense, attr):
            raise TypeError(f"{type(defense).__name__} lacks the class attribute {attr!r}")
    return _DEFENSES.add(defense.name, defense, replace=replace)


def unregister_defense(name: str) -> None:
    _DEFENSES.remove(name)


def _load_plugins() -> None:
    """Defenses installed by other packages (entry point group ``unbackdoor.defenses``)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="unbackdoor.defenses"):
        ep.load()  # the module registers its defenses on import


def defenses() -> list[Defense]:
    """Every registered defense, in registration order (built-ins first)."""
    _load_plugins()
    return list(_DEFENSES)


def defense_names() -> list[str]:
    return [d.name for d in defenses()]


def get_defense(name: str) -> Defense:
    _load_plugins()
    return _DEFENSES.get(name)
