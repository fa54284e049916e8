"""The terminal display of an experiment: ``[3/6] DBD ...`` headers, a bar with
ETA for stages that report progress, and a closing line with the stage's time."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def clock(s: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on)."""
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StageDisplay:
    """On a terminal the bar redraws in place; in a log it prints a line every 10%."""

    def __init__(self, total: int, prefix: str = "", file: TextIO | None = None, enabled: bool = True):
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.file = file or sys.stderr
        self.tty = self.file.isatty() if hasattr(self.file, "isatty") else False
        self.i = 0
        self.t_all = time.perf_counter()
        self._t0 = self._work = self._done = 0.0
        self._name = ""
        self._last_decile = -1
        self._first = True
        self._ref: float | None = None

    def _tag(self) -> str:
        return f"{self.prefix}[{self.i}/{self.total}]"

    def say(self, msg: str) -> None:
        if self.enabled:
            if self.tty:
                self.file.write("\r\033[K")
            print(msg, file=self.file, flush=True)

    def start(self, name: str, detail: str = "", work: float = 0.0) -> None:
        self.i += 1
        self._name, self._t0, self._work, self._done, self._last_decile = name, time.perf_counter(), work, 0.0, -1
        self._first, self._ref = True, None
        self.say(f"{self._tag()} {name}" + (f" — {detail}" if detail else ""))
        if work > 0 and self.tty:
            self.advance(0.0, "starting")

    def advance(self, amount: float, note: str = "") -> None:
        """Report progress within the stage (``amount`` in the units of ``work``)."""
        self.update_to(self._done + amount, note, amount)

    def update_to(self, done: float, note: str = "", amount: float | None = None) -> None:
        """Set the progress within the stage to ``done`` (units of ``work``); ``amount``: the
        part of it done since the last call (a resumed run starts part-way: only what this
        run did counts towards the speed behind the ETA)."""
        amount = done - self._done if amount is None else amount
        if not self.enabled or self._work <= 0:
            return
        if self._ref is None:
            self._ref = max(0.0, done - amount)
        self._done = min(self._work, max(0.0, done))
        frac = self._done / self._work
        el = time.perf_counter() - self._t0
        rate = (self._done - self._ref) / el if el > 0 else 0.0
        eta = (self._work - self._done) / rate if rate > 0 else math.nan
        eta_s = clock(eta) if math.isfinite(eta) else "?"
        if self.tty:
            width = 24
            fill = int(round(frac * width))
            bar = "█" * fill + "·" * (width - fill)
            self.file.write(f"\r\033[K{self._tag()} {self._name} |{bar}| {100 * frac:3.0f}% "
                            f"{clock(el)} elapsed, ETA {eta_s}  {note}")
            self.file.flush()
        else:
            dec = int(frac * 10)
            if dec > self._last_decile or (self._first and amount > 0):  # every 10%, and the first estimate
                self._last_decile = dec
                self._first = self._first and amount <= 0
                print(f"{self._tag()} {self._name} {100 * frac:3.0f}% · {clock(el)} elapsed, ETA {eta_s} · {note}",
                      file=self.file, flush=True)

    def done(self, note: str = "") -> float:
        el = time.perf_counter() - self._t0
        self.say(f"{self._tag()} {self._name} done in {clock(el)}" + (f" · {note}" if note else "")
                 + f" (total {clock(time.perf_counter() - self.t_all)})")
        return el

    def skip(self, name: str, why: str) -> None:
        self.i += 1
        self.say(f"{self._tag()} {name} — {why}")
