"""Every file name of data folders, run folders and experiment folders, and the
``metrics.json`` schema every run writes.

A **data folder** (``unbackdoor poison``) holds :data:`TRAIN`, :data:`TEST`,
:data:`HELDOUT`, :data:`ORIGINALS`, :data:`ATTACK` (+ :data:`ATTACK_TENSORS`),
:data:`CONFIG` and :data:`METRICS` (poisoning statistics, no schema).

A **run folder** (``train`` and every defense) holds the model directory
(:data:`MODEL_WEIGHTS` + :data:`MODEL_META`), :data:`CONFIG`, :data:`HISTORY`,
checkpoints, optional :data:`DETECTION_CSV` / :data:`DETECTION_JSON` (a defense
that flags training samples) and :data:`METRICS`, written last: a run is finished
when its metrics file exists. Its schema (:func:`run_metrics`)::

    {"schema": 1, "method": "bcu", "label": "BCU",
     "before": {clean_accuracy, attack_success_rate, robust_accuracy} | null,
     "final":  {clean_accuracy, attack_success_rate, robust_accuracy} | null,
     "stages": {"<stage>": {clean_accuracy, ...}, ...},
     "der": float | null, "seconds": float | null, ...method-specific keys}

``before`` is the model the defense started from (a post-training defense), ``final``
the model it produced; both are ``null`` where no labelled test set was given.

An **experiment folder** (``demo``, one attack of a ``sweep``) holds :data:`DATA_DIR`,
:data:`UNDEFENDED_DIR`, one folder per defense (its registry name),
:data:`EXPERIMENT`, :data:`EVALUATION` and the report files.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from unbackdoor.core.errors import RunFormatError
from unbackdoor.core.files import read_json

# data folder
TRAIN = "train.npz"
TEST = "test.npz"
HELDOUT = "heldout.npz"
ORIGINALS = "originals.npz"
ATTACK = "attack.json"
ATTACK_TENSORS = "attack.safetensors"
# every folder
CONFIG = "config.yaml"
METRICS = "metrics.json"
# run folder
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
HISTORY = "history.json"
CHECKPOINT = "checkpoint.pt"
CHECKPOINTS = "checkpoints"
DETECTION_CSV = "detection.csv"
DETECTION_JSON = "detection.json"
SCHEDULE = "schedule.json"
# experiment folder
DATA_DIR = "data"
UNDEFENDED_DIR = "undefended"
EXPERIMENT = "experiment.json"
EVALUATION = "evaluation.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
SUMMARY = "summary.json"
REPORT_FIGURES = "report_figures"
LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_CSV = "leaderboard.csv"

SCHEMA_VERSION = 1
METRIC_KEYS = ("clean_accuracy", "attack_success_rate", "robust_accuracy")
# The methods of a plain ``unbackdoor train`` run.
UNDEFENDED = "undefended"
CLEAN_REFERENCE = "clean"


def metric_block(m: dict | None) -> dict[str, float | None] | None:
    """The three headline numbers of an evaluation (``None`` where not measured)."""
    if m is None:
        return None
    return {k: (float(m[k]) if isinstance(m.get(k), (int, float)) else None) for k in METRIC_KEYS}


def run_metrics(method: str, label: str, final: dict | None, *, before: dict | None = None,
                stages: dict[str, dict] | None = None, der: float | None = None, seconds: float | None = None,
                **extra: Any) -> dict:
    """A ``metrics.json`` in the schema the report reads (module docstring); ``final``,
    ``before`` and ``stages`` may hold more keys (``n_*`` counts) than the three numbers."""
    clash = sorted(set(extra) & {"schema", "method", "label", "before", "final", "stages", "der", "seconds"})
    if clash:
        raise ValueError(f"reserved metrics keys: {clash}")
    return {"schema": SCHEMA_VERSION, "method": method, "label": label, "before": before, "final": final,
            "stages": dict(stages or {}), "der": der, "seconds": seconds, **extra}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def check_run_metrics(m: Any, where: str | os.PathLike = "metrics.json") -> dict:
    """``m`` if it is a run's metrics in the current schema, else a :class:`RunFormatError` saying why."""
    if not isinstance(m, dict):
        raise RunFormatError(f"{where}: not a JSON object")
    if m.get("schema") != SCHEMA_VERSION:
        raise RunFormatError(f"{where}: not a run's metrics in schema {SCHEMA_VERSION} (schema {m.get('schema')!r}); "
                             "it was written by another version of unbackdoor or another program: re-run it")
    for key in ("method", "label"):
        if not isinstance(m.get(key), str) or not m[key]:
            raise RunFormatError(f"{where}: '{key}' must be a non-empty string")
    for key in ("before", "final"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise RunFormatError(f"{where}: '{key}' must be an object or null")
    if not isinstance(m.get("stages", {}), dict):
        raise RunFormatError(f"{where}: 'stages' must be an object")
    return m


def read_run_metrics(folder: str | os.PathLike) -> dict:
    """A run folder's metrics, checked against the schema."""
    p = Path(folder) / METRICS
    if not p.is_file():
        raise RunFormatError(f"{folder} holds no {METRICS}: not a finished run")
    return check_run_metrics(read_json(p), p)


def headline(block: dict | None) -> dict[str, float | None]:
    """The three numbers of a ``before`` / ``final`` / stage block (``None`` where absent)."""
    block = block if isinstance(block, dict) else {}
    return {k: _num(block.get(k)) for k in METRIC_KEYS}
