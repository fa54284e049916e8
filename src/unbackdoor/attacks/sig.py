"""SIG (Barni et al. 2019): clean-label attack with a horizontal sinusoidal signal
v(i, j) = delta * sin(2 pi j f / W) added to target-class training images
(labels unchanged). Defaults delta = 40/255, f = 6 (BackdoorBench)."""
from __future__ import annotations

import math

import torch

from ..errors import UnbackdoorError
from .base import Attack, register


@register
class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, shape, num_classes, target=0, mode="all-to-one", seed=0, delta: float = 40 / 255, f: float = 6.0):
        super().__init__(shape, num_classes, target, mode, seed)
        if not 0 < delta <= 1:
            raise UnbackdoorError(f"SIG delta must be in (0, 1], got {delta}")
        self.delta, self.f = float(delta), float(f)
        c, h, w = self.shape
        j = torch.arange(w, dtype=torch.float32)
        self.signal = (self.delta * torch.sin(2 * math.pi * j * self.f / w)).view(1, 1, w).expand(c, h, w).contiguous()

    def apply(self, x, gen=None):
        return (x + self.signal.to(x)).clamp(0, 1)

    def params(self):
        return {"delta": self.delta, "f": self.f}
