"""What the data-side detectors (:mod:`.spectral`, :mod:`.activation_clustering`) share:
take the suspicious model's penultimate features of the training set, let the method
flag suspicious samples per class, retrain a fresh model of the same architecture on
the rest, and write what DBD writes for its split (``detection.csv`` / ``.json``), so
the report scores every detector the same way.

Both methods are filters, not repairs: the model they return has never seen the
flagged samples, and is only as clean as the filter was. The poison mask of the
training set (where known) only scores the detection afterwards; nothing here reads
it to decide.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from unbackdoor.core import layout
from unbackdoor.core.errors import EmptyDataset, UnbackdoorError
from unbackdoor.core.files import prepare_out_dir, read_json, rollback_on_failure, write_json, write_text, write_yaml
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.defenses.base import Defense, DefenseInputs, DefenseResult, Flag, Progress
from unbackdoor.metrics import der, detection_scores, evaluate
from unbackdoor.models.model_dir import penultimate_features, save_model, unwrap
from unbackdoor.models.registry import build_for_data, create
from unbackdoor.training.device import pick_device
from unbackdoor.training.distributed import current_context, run_on_main
from unbackdoor.training.engine import set_seed
from unbackdoor.training.fit import OptimSettings, TrainConfig, fit, optim_fields


@dataclass
class RetrainConfig(OptimSettings):
    """How the filtered training set is trained on: a fresh model, cross-entropy, as
    BackdoorBench retrains after Spectral and AC (defaults: its ``config/defense/{spectral,ac}``)."""

    steps: int | None = None  # if set: at least this many optimiser steps, whatever the kept set's size

    def epochs_for(self, n_kept: int) -> int:
        """Epochs for ``n_kept`` training images: ``epochs``, raised to reach ``steps`` optimiser
        steps where set (as the experiment sizes its undefended model, so a retrained model of the
        quick preset is trained as long as the model it replaces)."""
        if self.steps is None:
            return self.epochs
        per_epoch = max(1, n_kept // min(self.batch_size, max(1, n_kept)))
        return max(self.epochs, math.ceil(self.steps / per_epoch))

    @property
    def budget(self) -> str:
        return f"≥{self.steps} steps" if self.steps is not None else f"{self.epochs} epochs"


def quick_retrain() -> RetrainConfig:
    """The undefended model's training in the experiment (``TrainConfig`` defaults, at least
    4,000 SGD steps at batch 64): the retrained model is compared with it."""
    return RetrainConfig(**optim_fields(TrainConfig()), steps=4000)


@torch.no_grad()
def features_of(model: nn.Module, data: ImageDataset, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features (float32 (N, D), on the CPU) of ``data``'s images as the
    model sees them (float in [0, 1]), in batches on the model's device, in eval mode
    (BatchNorm's running statistics, as at test time)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [penultimate_features(model, data.images[i : i + batch_size].to(dev).float().div_(255))
               .flatten(1).float().cpu() for i in range(0, len(data), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def auroc(score: torch.Tensor, poisoned: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``score`` (higher = more suspicious) against the poison
    mask; None where one side is empty."""
    if poisoned.all() or not poisoned.any():
        return None
    from sklearn.metrics import roc_auc_score  # heavy: only when a run ends

    return float(roc_auc_score(poisoned.numpy(), score.double().numpy()))


def detection_table(train: ImageDataset, score: torch.Tensor, kept: torch.Tensor) -> str:
    """CSV text: index, label, score (the method's suspicion, higher = more suspicious),
    kept (1 = retrained on) and poisoned where known: DBD's columns with ``score`` for its loss."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    known = train.poisoned is not None
    w.writerow(["index", "label", "score", "kept"] + (["poisoned"] if known else []))
    sc, kp, lab = score.tolist(), kept.tolist(), train.labels.tolist()
    pois = train.poisoned.tolist() if known else None
    for i in range(len(sc)):
        w.writerow([i, lab[i], f"{sc[i]:.6g}", int(kp[i])] + ([int(pois[i])] if known else []))
    return buf.getvalue()


@dataclass
class Flags:
    """A detector's verdict on a training set."""

    flagged: torch.Tensor  # bool (N,): removed before retraining
    score: torch.Tensor  # float (N,): continuous suspicion, higher = more suspicious
    classes: list[dict] = field(default_factory=list)  # per-class summary (label, n, flagged, ...)


def fresh_model(inputs: DefenseInputs, train: ImageDataset, seed: int) -> nn.Module:
    """A newly initialised model of the suspicious model's architecture.

    Built from the model's own ``arch`` where it has one: that keeps its width and input
    normalisation (a BackdoorBench import), and the CLI's ``inputs.arch`` is the model's path."""
    arch = getattr(unwrap(inputs.model), "arch", None) if inputs.model is not None else None
    set_seed(seed)
    if isinstance(arch, dict) and "name" in arch:
        kw = {k: v for k, v in arch.items() if k != "name"}
        if (kw.get("in_channels"), kw.get("image_size"), kw.get("image_size")) != train.shape:
            raise UnbackdoorError(f"the model takes images {(kw.get('in_channels'), kw.get('image_size'))} "
                                  f"(channels, side), the training set holds {train.shape}")
        if kw.get("num_classes") != train.num_classes:
            raise UnbackdoorError(f"the model has {kw.get('num_classes')} classes, the training set "
                                  f"{train.num_classes}")
        return create(arch["name"], **kw)
    return build_for_data(inputs.arch, train)


class FilterDefense(Defense):
    """A defense that flags training samples with the suspicious model's features and
    retrains on the rest. Subclasses set the class attributes and implement :meth:`flag`."""

    needs = ("train_set", "model")
    history_stage = "retraining"
    rule: ClassVar[str] = ""  # the flagging rule in a few words (detection.json)

    def flag(self, feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: Any) -> Flags:
        """The method itself: ``feats`` float (N, D), ``labels`` int (N,) (the given, possibly
        poisoned labels). Every subclass implements it."""
        raise NotImplementedError

    setting_keys: ClassVar[tuple[str, ...]] = ()  # the config keys of the flagging rule

    def settings(self, cfg: Any) -> dict:
        """The flagging settings recorded in detection.json."""
        return {k: getattr(cfg, k) for k in self.setting_keys}

    budget_keys = ("retrain.epochs", "retrain.steps")
    flags = (Flag("--epochs", "retraining epochs (replaces the preset's step budget)", int, key="retrain.epochs"),
             Flag("--batch-size", "retraining batch size", int, key="retrain.batch_size"),
             Flag("--lr", "retraining learning rate", float, key="retrain.lr"))

    # ---------------------------------------------------------------- the run
    def run(self, inputs: DefenseInputs, cfg: Any, out_dir: str | os.PathLike, *, resume: bool = False,
            force: bool = False, progress: Progress | None = None) -> DefenseResult:
        self.check(inputs)
        cfg.validate()
        train = inputs.train
        if len(train) == 0:
            raise EmptyDataset(f"{self.label} needs a non-empty training set, got 0 images")
        ctx = current_context()
        was_missing = not os.path.exists(out_dir)
        out = Path(run_on_main(ctx, lambda: prepare_out_dir(out_dir, force=force, resume=resume)))
        report = progress or (lambda frac, note: None)
        with rollback_on_failure(out, was_missing, ctx.is_main and not resume):
            t0 = time.perf_counter()
            feats = features_of(_on_device(inputs.model, pick_device(cfg.engine.device)), train, cfg.eval_batch_size)
            t_feat = time.perf_counter() - t0
            with threadpool_limits(limits=1):
                # One thread: the per-class SVDs / k-means are tiny, and on a shared 2-core machine OpenMP
                # spin-waiting made them (and the first training epoch after them) several times slower.
                flags = self.flag(feats, train.labels, train.num_classes, cfg)
            t_flag = time.perf_counter() - t0 - t_feat
            kept = ~flags.flagged
            n_kept = int(kept.sum())
            if n_kept == 0:
                raise EmptyDataset(f"{self.label} flagged all {len(train)} training images: nothing is left to "
                                   "train on")
            detection: dict = {"method": self.name, "rule": self.rule, **self.settings(cfg),
                               "n_flagged": int(flags.flagged.sum()), "n_kept": n_kept, "classes": flags.classes}
            if train.poisoned is not None:  # scoring only: the mask decided nothing above
                detection.update(detection_scores(flags.flagged, train.poisoned))
                detection["auroc"] = auroc(flags.score, train.poisoned)
            flagged_idx = torch.nonzero(flags.flagged).flatten().tolist()
            _check_resumed_split(out, flagged_idx, resume)
            epochs = cfg.retrain.epochs_for(n_kept)
            if ctx.is_main:
                write_yaml(out / layout.CONFIG, {"command": self.name,
                                                 self.name: asdict(cfg) | {"engine": asdict(cfg.engine)},
                                                 "retrain_epochs": epochs, "provenance": inputs.provenance})
                write_text(out / layout.DETECTION_CSV, detection_table(train, flags.score, kept))
                write_json(out / layout.DETECTION_JSON, {**detection, "flagged_indices": flagged_idx})
            report(0.02, f"flagged {detection['n_flagged']} of {len(train)}")
            model = fresh_model(inputs, train, cfg.seed)
            rt = cfg.retrain
            train_cfg = TrainConfig(**optim_fields(rt) | {"epochs": epochs, "batch_size": min(rt.batch_size, n_kept)},
                                    seed=cfg.seed, engine=cfg.engine)
            done = [0]

            def on_epoch(_model: nn.Module) -> dict:
                # fit has no epoch callback; its per-epoch hook reports progress and adds nothing to the history
                done[0] += 1
                report(0.02 + 0.98 * min(1.0, done[0] / epochs), f"retrain {done[0]}/{epochs}")
                return {}

            res = fit(model, train.subset(torch.nonzero(kept).flatten()), train_cfg,
                      checkpoint=out / layout.CHECKPOINT, resume=resume, evaluate=on_epoch, desc="retrain")
            before, final = _measure(inputs.model, inputs), _measure(res.model, inputs)
            d = (der(before["clean_accuracy"], before["attack_success_rate"], final["clean_accuracy"],
                     final["attack_success_rate"]) if before and inputs.attack is not None else None)
            metrics = layout.run_metrics(
                self.name, self.label, final, before=before, der=d, detection=detection,
                seconds={"features": round(t_feat, 2), "flagging": round(t_flag, 2), "retrain": round(res.seconds, 2),
                         "total": round(t_feat + t_flag + res.seconds, 2)},
                n_train=len(train), n_kept=n_kept, retrain_epochs=epochs, precision=res.precision)
            if ctx.is_main:
                save_model(res.model, out, classes=train.classes, provenance={"command": self.name, **inputs.provenance})
                write_json(out / layout.HISTORY, res.history)
                write_json(out / layout.METRICS, metrics)
        ctx.barrier()
        return DefenseResult(res.model, metrics, flags)


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` where it already sits on ``dev``, else a copy moved there: the suspicious
    model is an input, not to be moved under its owner's feet."""
    p = next(model.parameters(), None)
    return model if p is None or p.device.type == dev.type else copy.deepcopy(model).to(dev)


def _measure(model: nn.Module, inputs: DefenseInputs) -> dict | None:
    return evaluate(model, inputs.test, inputs.attack) if inputs.test is not None else None


def _check_resumed_split(out, flagged: list[int], resume: bool) -> None:
    """A resumed retraining must continue on the samples it started on: the flags are
    recomputed (deterministic), and a different verdict is an error, not a silent mix."""
    f = out / layout.DETECTION_JSON
    if not (resume and (out / layout.CHECKPOINT).is_file() and f.is_file()):
        return
    try:
        before = read_json(f).get("flagged_indices")
    except (UnbackdoorError, AttributeError):
        return
    if isinstance(before, list) and before != flagged:
        raise UnbackdoorError(f"{out}: the checkpoint was trained on another subset ({len(before)} samples flagged "
                              f"then, {len(flagged)} now: other settings or model); start it over (overwrite the folder)")


def class_indices(labels: torch.Tensor, num_classes: int) -> list[np.ndarray]:
    """Indices of each class's samples (the detectors look at one class at a time)."""
    lab = labels.numpy()
    return [np.flatnonzero(lab == c) for c in range(num_classes)]

