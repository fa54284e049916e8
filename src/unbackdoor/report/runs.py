"""Find run directories in a tree and read what they measured.

A folder counts as

- a **data run** when it holds ``train.npz`` (what ``unbackdoor poison`` writes;
  ``attack.json`` names the attack, ``train.npz`` carries the poison mask);
- a **model run** when it holds ``metrics.json`` in the run schema of
  :mod:`unbackdoor.core.layout` (``train`` and every defense write it): its
  ``method`` is the run's role, its ``label`` the row's name. A ``metrics.json`` in
  another format is a :class:`~unbackdoor.core.errors.RunFormatError` naming the folder.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from unbackdoor.core import layout
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import read_json
from unbackdoor.defenses import defense_names

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
        return layout.headline(self.metrics.get("final"))

    @property
    def before(self) -> dict[str, float | None] | None:
        """The same of the model a post-training defense started from (None: not such a run)."""
        b = self.metrics.get("before")
        return layout.headline(b) if isinstance(b, dict) else None

    @property
    def stages(self) -> dict[str, dict[str, float | None]]:
        """Per-stage numbers of a defense, in file order."""
        return {k: layout.headline(v) for k, v in (self.metrics.get("stages") or {}).items() if isinstance(v, dict)}

    @property
    def seconds(self) -> float | None:
        t = (self.metrics.get("seconds") or {}).get("total") if isinstance(self.metrics.get("seconds"), dict) else None
        return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


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
    """A ``detection.csv`` as columns: index (int), label (int), loss (float: DBD's final loss) or
    score (float: a detector's suspicion, Spectral's or AC's), kept (bool); both rank high = suspicious.

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
                elif k in ("loss", "score"):
                    cols[k].append(float(v))
                elif k == "kept":
                    cols[k].append(str(v).strip().lower() in ("1", "true", "yes", "t", "kept"))
                else:
                    cols[k].append(v)
    return cols


def _is_model_run(p: Path) -> bool:
    return (p / layout.METRICS).is_file() and not (p / layout.TRAIN).is_file()


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
        metrics = layout.read_run_metrics(p)
        config = _read_yaml_safe(p / layout.CONFIG)
        history = _read_json_safe(p / layout.HISTORY)
        run = ModelRun(p, metrics["method"], metrics, config, history, label=metrics["label"])
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
    """Row labels: the run's own, plus the folder name where a label occurs twice for the same data."""
    seen: dict[tuple, int] = {}
    for r in runs:
        key = (r.data.path if r.data else None, r.label)
        seen[key] = seen.get(key, 0) + 1
    for r in runs:
        if seen[(r.data.path if r.data else None, r.label)] > 1:
            r.label = f"{r.label} ({r.path.name})"


def role_order() -> list[str]:
    """Display order of the roles: the undefended model, the clean reference, the defenses as registered."""
    return [layout.UNDEFENDED, layout.CLEAN_REFERENCE, *defense_names()]


def sort_runs(runs: list[ModelRun]) -> list[ModelRun]:
    order = role_order()
    return sorted(runs, key=lambda r: (order.index(r.role) if r.role in order else len(order), str(r.path)))
