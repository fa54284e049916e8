"""Progress display: a tqdm bar on a terminal, one summary line per epoch otherwise
(logs and CI stay readable)."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Bar over ``total`` steps for one epoch, showing loss / accuracy / images per second."""

    def __init__(self, total: int, desc: str, enabled: bool = True, log_every_epoch: bool = True):
        self.enabled = enabled
        self.desc = desc
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr) if self.tty else None
        self.t0 = time.perf_counter()
        self.images = 0
        self.log = log_every_epoch and enabled

    def update(self, n_images: int, **stats: float) -> None:
        self.images += n_images
        if self.bar is not None:
            self.bar.update(1)
            el = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in stats.items()}, "img/s": f"{self.images / el:.0f}"}, refresh=False)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def close(self, **summary: float) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log:
            parts = " ".join(f"{k}={v:.4g}" for k, v in summary.items())
            print(f"{self.desc}: {parts} img/s={self.images_per_second:.0f} "
                  f"({time.perf_counter() - self.t0:.1f}s)", file=sys.stderr, flush=True)
