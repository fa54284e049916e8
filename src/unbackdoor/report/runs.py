"""Find run directories in a tree and read what they measured.

A report is built from whatever the commands left on disk, so this module is
deliberately forgiving: a folder counts as

- a **data run** when it holds ``train.npz`` (what ``unbackdoor poison`` writes;
  ``attack.json`` names the attack, ``train.npz`` carries the poison mask);
- a **model run** when it holds ``model.json``, ``metrics.json`` or
  ``detection.csv`` (``train``, ``dbd``, ``bcu``).

Which method produced a model run is read from its ``config.yaml``
(``command:``), then from its files (``detection.csv`` means DBD, a
``before``/``after`` pair in ``metrics.json`` means BCU), then from its folder
name. Missing or unexpected keys never fail the report; they leave a blank.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import read_json

# Display order and labels of the roles a model run can play.
ROLES = ("undefended", "clean", "dbd", "bcu", "model")
ROLE_LABELS = {"undefended": "Undefended", "clean": "Clean reference", "dbd": "DBD", "bcu": "BCU", "model": "Model"}
METRIC_KEYS = ("clean_accuracy", "attack_success_rate", "robust_accuracy")
_ALIASES = {
    "clean_accuracy": ("clean_accuracy", "ba", "BA", "acc", "accuracy", "clean_acc"),
    "attack_success_rate": ("attack_success_rate", "asr", "ASR"),
    "robust_accuracy": ("robust_accuracy", "ra", "RA"),
}
# Where a defense may keep its final numbers inside metrics.json, most specific first.
_FINAL_KEYS = ("after", "final", "after_stage3", "stage3", "stage_3", "stage-3", "finetune", "defended", "test")
_SKIP_DIRS = {".git", "__pycache__", "figures", "report_figures", ".venv", "node_modules"}


@dataclass
class DataRun:
    """A poisoned-data folder."""

    path: Path
    stats: dict = field(default_factory=dict)  # its metrics.json (poisoning statistics)
    attack: dict | None = None  # its attack.json

    @property
    def attack_name(self) -> str:
        if self.attack:
            return str(self.attack.get("name", "?"))
        return str(self.stats.get("attack", "clean"))

    @property
    def title(self) -> str:
        """e.g. ``badnets on mnist5k (10% poisoned, target 0)``."""
        s = self.stats
        bits = []
        if s.get("rate") is not None:
            bits.append(f"{100 * float(s['rate']):.3g}% poisoned")
        tgt = (self.attack or {}).get("target", s.get("target"))
        mode = (self.attack or {}).get("mode", s.get("mode", "all-to-one"))
        if mode == "all-to-all":
            bits.append("all-to-all")
        elif tgt is not None:
            names = self.class_names
            named = 0 <= int(tgt) < len(names) and names[int(tgt)] != str(tgt)
            bits.append(f"target {tgt}" + (f": {names[int(tgt)]}" if named else ""))
        ds = f" on {s['dataset']}" if s.get("dataset") else ""
        return f"{self.attack_name}{ds}" + (f" ({', '.join(bits)})" if bits else "")

    @property
    def class_names(self) -> list[str]:
        """Class names: the poisoning statistics', else those stored in ``test.npz`` ([] if neither)."""
        if self.stats.get("classes"):
            return [str(c) for c in self.stats["classes"]]
        try:
            with np.load(self.path / "test.npz", allow_pickle=False) as z:
                return [str(c) for c in z["classes"]] if "classes" in z.files else []
        except (OSError, ValueError, KeyError):
            return []

    @property
    def target(self) -> int | None:
        t = (self.attack or {}).get("target", self.stats.get("target"))
        return None if t is None else int(t)


@dataclass
class ModelRun:
    """A training / defense output folder."""

    path: Path
    role: str
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    history: Any = None
    data: DataRun | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)  # what the report computed (detection scores)

    @property
    def has_model(self) -> bool:
        return (self.path / "model.json").is_file() and (self.path / "model.safetensors").is_file()

    @property
    def detection_file(self) -> Path | None:
        p = self.path / "detection.csv"
        return p if p.is_file() else None

    @property
    def final(self) -> dict[str, float | None]:
        """Clean accuracy / ASR / robust accuracy of the model this run produced."""
        return final_metrics(self.metrics)


# ---------------------------------------------------------------------------- metric extraction
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pick(d: dict, key: str) -> float | None:
    for k in _ALIASES.get(key, (key,)):
        if k in d:
            v = _num(d[k])
            if v is not None:
                return v
    return None


def _has_metrics(d: Any) -> bool:
    return isinstance(d, dict) and _pick(d, "clean_accuracy") is not None


def final_metrics(m: dict) -> dict[str, float | None]:
    """The final BA / ASR / RA in a metrics.json of any of our commands.

    ``train`` writes them at the top level; a defense may nest them
    (``after``, ``final``, ``stage3`` ...). The most specific place wins.
    """
    if not isinstance(m, dict):
        return {k: None for k in METRIC_KEYS}
    src: dict | None = None
    for k in _FINAL_KEYS:
        if _has_metrics(m.get(k)):
            src = m[k]
            break
    if src is None and _has_metrics(m):
        src = m
    if src is None:  # the last nested block that holds a clean accuracy (e.g. the last stage)
        nested = [v for v in m.values() if _has_metrics(v)]
        src = nested[-1] if nested else {}
    return {k: _pick(src, k) for k in METRIC_KEYS}


def before_metrics(m: dict) -> dict[str, float | None] | None:
    """The 'before' block of a defense's metrics.json (BCU: the teacher), if any."""
    for k in ("before", "teacher", "undefended"):
        if isinstance(m, dict) and _has_metrics(m.get(k)):
            return {key: _pick(m[k], key) for key in METRIC_KEYS}
    return None


def stage_metrics(m: dict) -> dict[str, dict[str, float | None]]:
    """Per-stage metric blocks of a defense (``{"stage2": {...}, "stage3": {...}}``), in file order."""
    out = {}
    if isinstance(m, dict):
        for k, v in m.items():
            if _has_metrics(v) and k not in ("before", "teacher", "undefended"):
                out[k] = {key: _pick(v, key) for key in METRIC_KEYS}
    return out


# ---------------------------------------------------------------------------- reading files
def _read_json_safe(p: Path) -> Any:
    try:
        return read_json(p) if p.is_file() else None
    except UnbackdoorError:
        return None


def _read_yaml_safe(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        d = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, OSError):
        return {}
    return d if isinstance(d, dict) else {}


def read_detection(path: str | os.PathLike) -> dict[str, list]:
    """DBD's ``detection.csv`` as columns: index (int), label (int), loss (float), kept (bool).

    Unknown extra columns are kept as strings; a missing column is an empty list.
    """
    cols: dict[str, list] = {"index": [], "label": [], "loss": [], "kept": []}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            for k, v in row.items():
                if k is None:
                    continue
                k = k.strip()
                cols.setdefault(k, [])
                if k in ("index", "label"):
                    cols[k].append(int(float(v)))
                elif k == "loss":
                    cols[k].append(float(v))
                elif k == "kept":
                    cols[k].append(str(v).strip().lower() in ("1", "true", "yes", "t", "kept"))
                else:
                    cols[k].append(v)
    return cols


def _role_of(path: Path, config: dict, metrics: dict, model_meta: dict | None) -> str:
    cmd = str(config.get("command", "") or "").lower()
    if not cmd and model_meta:
        cmd = str((model_meta.get("provenance") or {}).get("command", "") or "").lower()
    if cmd == "train":
        clean = config.get("clean", (model_meta or {}).get("provenance", {}).get("clean", False))
        return "clean" if clean else "undefended"
    if cmd in ("dbd", "bcu"):
        return cmd
    if (path / "detection.csv").is_file():
        return "dbd"
    if isinstance(metrics, dict) and before_metrics(metrics) is not None:
        return "bcu"
    name = path.name.lower()
    for role in ("dbd", "bcu", "undefended", "clean"):
        if role in name:
            return role
    if "backdoor" in name or "attacked" in name or "poisoned" in name:
        return "undefended"
    return "model"


def _is_model_run(p: Path) -> bool:
    return any((p / f).is_file() for f in ("model.json", "detection.csv")) or (
        (p / "metrics.json").is_file() and not (p / "train.npz").is_file()
    )


def discover(root: str | os.PathLike) -> tuple[list[DataRun], list[ModelRun]]:
    """All data and model runs under ``root`` (``root`` itself may be one).

    A run folder is not searched further: checkpoints or stage folders a
    command keeps inside its output are part of that run.
    """
    root = Path(root)
    if not root.exists():
        raise UnbackdoorError(f"run directory not found: {root}")
    if not root.is_dir():
        raise UnbackdoorError(f"{root} is not a directory; pass a run directory or a folder of runs")
    data_runs: list[DataRun] = []
    model_paths: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        p = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        if (p / "train.npz").is_file():
            stats = _read_json_safe(p / "metrics.json") or {}
            attack = _read_json_safe(p / "attack.json")
            data_runs.append(DataRun(p, stats if isinstance(stats, dict) else {}, attack if isinstance(attack, dict) else None))
            dirnames[:] = []
        elif _is_model_run(p):
            model_paths.append(p)
            dirnames[:] = []
    runs = []
    for p in model_paths:
        metrics = _read_json_safe(p / "metrics.json")
        metrics = metrics if isinstance(metrics, dict) else {}
        config = _read_yaml_safe(p / "config.yaml")
        meta = _read_json_safe(p / "model.json")
        meta = meta if isinstance(meta, dict) else None
        role = _role_of(p, config, metrics, meta)
        history = _read_json_safe(p / "history.json")
        run = ModelRun(p, role, metrics, config, history)
        run.data = _find_data(p, config, data_runs, root)
        runs.append(run)
    _label_runs(runs)
    return data_runs, runs


def _find_data(p: Path, config: dict, data_runs: list[DataRun], root: Path, depth: int = 0) -> DataRun | None:
    by_path = {d.path.resolve(): d for d in data_runs}
    prov = config.get("provenance") if isinstance(config.get("provenance"), dict) else {}
    # 1. the path recorded in the run's config (train/dbd CLI: data, provenance.data)
    for v in (config.get("data"), config.get("data_dir"), prov.get("data")):
        if isinstance(v, str) and v not in ("api", ""):
            for cand in (Path(v), p / v, p.parent / v, root / v):
                try:
                    r = cand.resolve()
                except OSError:
                    continue
                if r in by_path:
                    return by_path[r]
                if cand.is_dir() and (cand / "train.npz").is_file():
                    d = DataRun(cand, _read_json_safe(cand / "metrics.json") or {}, _read_json_safe(cand / "attack.json"))
                    data_runs.append(d)
                    by_path[r] = d
                    return d
    # 1b. BCU records its teacher: the teacher's data is the data
    t = prov.get("teacher")
    if isinstance(t, str) and depth < 3:
        for cand in (Path(t), p.parent / t, root / t):
            if cand.is_dir() and cand.resolve() != p.resolve() and (cand / "config.yaml").is_file():
                d = _find_data(cand, _read_yaml_safe(cand / "config.yaml"), data_runs, root, depth + 1)
                if d is not None:
                    return d
    # 2. the nearest ancestor's ``data`` folder (the demo / sweep layout), or an ancestor data folder
    # (up to one level above ``root``, so a report on ``runs/demo/dbd`` still finds ``runs/demo/data``)
    stop = root.resolve().parent
    for anc in [p.resolve(), *p.resolve().parents]:
        for cand in (anc / "data", anc):
            if cand in by_path:
                return by_path[cand]
            if cand.is_dir() and (cand / "train.npz").is_file() and anc == stop:
                d = DataRun(cand, _read_json_safe(cand / "metrics.json") or {}, _read_json_safe(cand / "attack.json"))
                data_runs.append(d)
                return d
        if anc == stop:
            break
    # 3. the only data folder in the tree
    return data_runs[0] if len(data_runs) == 1 else None


def _label_runs(runs: list[ModelRun]) -> None:
    """Row labels: the role, plus the folder name where a role occurs twice for the same data."""
    seen: dict[tuple, int] = {}
    for r in runs:
        key = (r.data.path if r.data else None, r.role)
        seen[key] = seen.get(key, 0) + 1
    for r in runs:
        key = (r.data.path if r.data else None, r.role)
        base = ROLE_LABELS.get(r.role, r.role)
        r.label = f"{base} ({r.path.name})" if seen[key] > 1 else base


def sort_runs(runs: list[ModelRun]) -> list[ModelRun]:
    return sorted(runs, key=lambda r: (ROLES.index(r.role) if r.role in ROLES else len(ROLES), str(r.path)))
