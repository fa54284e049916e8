"""The epoch loop every training stage shares: supervised training (:func:`fit`),
DBD's three stages and BCU's distillation.

:func:`run_epochs` owns the skeleton; a stage supplies only the batches of one
epoch (``one_epoch``). Per epoch the loop

1. stops if the stage says so (``stop``) or the length is reached (``epochs``,
   or a budget's ``end`` for a length decided while training, re-read every epoch),
2. puts the model in train mode and calls ``one_epoch`` with an :class:`Epoch`:
   the epoch's random stream (``Engine.generator(epoch, stream)``, identical
   across resumes and ranks), its progress bar and the DDP sum of its stats,
3. adds ``evaluate(model)`` on rank 0 (every ``eval_every`` epochs and the last),
   the epoch's wall time, and prints the summary line,
4. appends the record to the history and writes the checkpoint atomically
   (``Engine.save``: model, optimizer, scheduler, scaler, epoch, history, the
   run's settings, the budget's state and the stage's own ``state()``),
5. calls ``on_epoch(record)``.

Resume, with one rule for every stage: a checkpoint holds ``settings``, the
configuration that determines the numbers (the caller's ``settings`` dict plus
the engine's seed, minus :data:`ALWAYS_MAY_CHANGE` and the caller's
``may_change``: what may differ between a run and its continuation, such as the
engine options - device, progress, compile; the precision is always the
checkpoint's). A resumed run must have exactly the same settings, key by key; a
difference raises :class:`UnbackdoorError` naming every differing key, since
continuing would silently mix two runs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import plain
from unbackdoor.training.engine import Engine
from unbackdoor.training.progress import Progress

# Settings that never block a resume: how a run executes, not what it computes
# (the engine options; a resumed run keeps the checkpoint's precision anyway).
ALWAYS_MAY_CHANGE = frozenset({"engine"})


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()  # a key one side lacks


class Budget(Protocol):
    """A stage length decided while training (e.g. :class:`~unbackdoor.training.budget.PlateauBudget`):
    ``end`` epochs in all (may grow from ``inf`` while the loop runs) and a plain-data ``state``
    that the checkpoint stores and a resume restores."""

    state: dict

    @property
    def end(self) -> float: ...

    def shown_end(self) -> str: ...


@dataclass
class Epoch:
    """What ``one_epoch`` gets: the epoch (0-based ``index``), its random stream and helpers."""

    index: int
    gen: torch.Generator  # Engine.generator(index, stream): the same on every resume and rank
    show: bool  # an evaluation epoch (every ``eval_every`` and the last): its summary line is printed
    engine: Engine
    desc: str
    length: Callable[[], str]  # the stage's length as known now (a budget may fix it during the epoch)
    bar: Progress | None = None

    def progress(self, total: int) -> Progress:
        """Start the epoch's progress bar over ``total`` steps (its clock gives images per second)."""
        self.bar = Progress(total, f"{self.desc} epoch {self.index + 1}/{self.length()}",
                            enabled=self.engine.opts.progress and self.engine.dist.is_main, log_every_epoch=self.show)
        return self.bar

    def all_reduce_sum(self, *values: torch.Tensor | float) -> torch.Tensor:
        """The sum over ranks of the epoch's stats: one 1-D tensor, or scalars stacked into one."""
        if len(values) == 1 and isinstance(values[0], torch.Tensor) and values[0].ndim == 1:
            t = values[0]
        else:
            t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.engine.device) for v in values])
        return self.engine.dist.all_reduce_sum(t)


def plain_settings(settings: Mapping[str, Any], may_change: Collection[str] = ()) -> dict:
    """``settings`` as the checkpoint stores them: without the keys that may change, tuples as lists."""
    skip = ALWAYS_MAY_CHANGE | set(may_change)
    return {k: plain(v) for k, v in settings.items() if k not in skip}


def check_settings(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str | os.PathLike) -> None:
    """The resume rule: every key of either side must have the same value on both."""
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k, _MISSING) != current.get(k, _MISSING))
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k, _MISSING)!r} -> {current.get(k, _MISSING)!r}" for k in diff)
        raise UnbackdoorError(f"cannot resume from {checkpoint}: it was written with different settings ({shown}); "
                              "continuing with other settings would mix two runs: use the same settings "
                              "or start afresh with --force")


def run_epochs(
    eng: Engine,
    one_epoch: Callable[[Epoch], dict],
    *,
    epochs: int | None = None,
    budget: Budget | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    settings: Mapping[str, Any] | None = None,
    may_change: Collection[str] = (),
    state: Callable[[], dict] | None = None,
    restore: Callable[[dict], None] | None = None,
    stop: Callable[[], bool] | None = None,
    stream: int = 0,
    desc: str = "train",
    summary: Sequence[str] | Mapping[str, str] = ("loss",),
    evaluate: Callable[[nn.Module], dict] | None = None,
    eval_every: int = 1,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train epoch after epoch; return the history (one record per epoch, earlier runs' included).

    Args:
        eng: the engine, its optimizer (and scheduler) already set.
        one_epoch: trains one epoch and returns its record (``epoch`` is added in front).
        epochs: the number of epochs, unless ``budget`` decides (its ``end``, re-read every epoch).
        checkpoint: written atomically after every epoch; with ``resume`` an existing one is
            loaded first (model, optimizer, ..., history, budget state, then ``restore(ckpt)``)
            and training continues after its epoch.
        settings: the configuration that determines the numbers (see the module docstring);
            ``may_change`` names its keys that a resumed run may change.
        state: extra plain-data entries for every checkpoint (a stage's own guard, ...).
        stop: asked before every epoch; True ends the loop (an early stop).
        stream: the sub-stream of ``Engine.generator``.
        desc, summary: the progress label, and the record keys of the epoch's summary line
            (a mapping: shown name -> record key).
        evaluate: called on ``eng.model`` on rank 0 every ``eval_every`` epochs and after the last;
            its dict joins the record.
        on_epoch: called with the record after the checkpoint is written.
    """
    if (epochs is None) == (budget is None):
        raise ValueError("run_epochs needs exactly one of epochs and budget")
    current = plain_settings(settings or {}, may_change)
    current.setdefault("seed", eng.seed)
    history: list[dict] = []
    start = 0
    if resume and checkpoint and Path(checkpoint).exists():
        st = eng.load(checkpoint)
        if "settings" in st:
            saved = dict(st["settings"])
        else:  # written before checkpoints held settings: the whole config was stored
            saved = plain_settings(st.get("config") or {}, may_change)
            saved.setdefault("seed", st.get("seed"))
        check_settings(saved, current, checkpoint)
        start, history = int(st["epoch"]) + 1, list(st.get("history", []))
        if budget is not None and st.get("budget") is not None:
            budget.state = dict(st["budget"])
        if restore is not None:
            restore(st)
    labels = dict(summary) if isinstance(summary, Mapping) else {k: k for k in summary}

    def end() -> float:
        return budget.end if budget is not None else epochs

    def length() -> str:
        return budget.shown_end() if budget is not None else str(epochs)

    epoch = start
    while epoch < end():
        if stop is not None and stop():
            break
        t0 = time.perf_counter()
        last = epoch + 1 == end()
        ep = Epoch(epoch, eng.generator(epoch, stream), (epoch + 1) % eval_every == 0 or last, eng, desc, length)
        eng.train_model.train()
        rec = {"epoch": epoch + 1, **one_epoch(ep)}
        if evaluate is not None and ep.show and eng.dist.is_main:
            rec.update(evaluate(eng.model))
        rec["seconds"] = time.perf_counter() - t0
        if ep.bar is not None:
            ep.bar.close(**{name: rec[k] for name, k in labels.items() if k in rec})
        history.append(rec)
        extra = dict(state()) if state is not None else {}
        if budget is not None:
            extra["budget"] = budget.state
        eng.save(checkpoint, epoch=epoch, history=history, settings=current, **extra)
        if on_epoch is not None:
            on_epoch(rec)
        epoch += 1
    return history




__all__ = ["ALWAYS_MAY_CHANGE", "Budget", "Epoch", "check_settings", "plain_settings", "run_epochs"]
