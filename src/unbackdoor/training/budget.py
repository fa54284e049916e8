"""How long a stage trains when its length is decided by what the run observes.

A *plateau budget*: the learning rate stays constant while a signal the stage
can measure without any ground truth (DBD stage 3: the model's agreement with
the given labels; BCU: the student's agreement with the teacher) keeps rising;
once it has not risen by ``delta`` for ``patience`` epochs (checked from
``min_epochs`` on, or forced at ``max_epochs``), a cosine cool-down of
``cooldown`` times the epochs so far ends the stage. Harder data rises more
slowly and so gets more epochs, with the same settings for every dataset.

The state is plain data, saved in every checkpoint, so a resumed run takes
exactly the decisions an uninterrupted one takes.
"""
from __future__ import annotations

import math


class PlateauBudget:
    def __init__(self, min_epochs: float, max_epochs: int, patience: int, delta: float, cooldown: float,
                 state: dict | None = None):
        self.min_epochs, self.max_epochs = min_epochs, max_epochs
        self.patience, self.delta, self.cooldown = patience, delta, cooldown
        self.state = dict(state or {"best": -math.inf, "bad": 0, "cool_start": None, "end": None})

    @property
    def end(self) -> float:
        """Epochs in all (inf until the cool-down has started)."""
        return math.inf if self.state["end"] is None else self.state["end"]

    def shown_end(self) -> str:
        return str(self.state["end"]) if self.state["end"] is not None else f"<={self.max_epochs}+cool-down"

    def observe(self, epochs_done: int, signal: float) -> None:
        """After ``epochs_done`` epochs the signal is ``signal``; may start the cool-down."""
        st = self.state
        if st["cool_start"] is not None:
            return
        if signal > st["best"] + self.delta:
            st.update(best=signal, bad=0)
        elif epochs_done >= self.min_epochs:
            st["bad"] += 1
        if st["bad"] >= self.patience or epochs_done >= self.max_epochs:
            st.update(cool_start=epochs_done, end=epochs_done + max(1, math.ceil(self.cooldown * epochs_done)))

    def cooldown_progress(self, progress: float) -> float | None:
        """Fraction of the cool-down done at ``progress`` (epochs, fractional), or None before it."""
        st = self.state
        if st["cool_start"] is None or progress < st["cool_start"]:
            return None
        return min(1.0, (progress - st["cool_start"]) / (st["end"] - st["cool_start"]))

    def lr_factor(self, progress: float) -> float:
        """1 before the cool-down, then cosine down to 0 over it."""
        c = self.cooldown_progress(progress)
        return 1.0 if c is None else 0.5 * (1 + math.cos(math.pi * c))
