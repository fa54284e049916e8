"""BadNets (Gu et al. 2017): a small solid patch stamped on the image.
Default: 3x3 white square in the bottom-right corner (BackdoorBench's setting)."""
from __future__ import annotations

import torch

from unbackdoor.attacks.base import Attack, register
from unbackdoor.core.errors import UnbackdoorError

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def patch_origin(position: str | tuple[int, int] | list[int], size: int, h: int, w: int, margin: int = 0) -> tuple[int, int]:
    """Top-left (row, col) of a ``size`` patch at a named position or an explicit (row, col)."""
    if isinstance(position, (tuple, list)):
        r, c = int(position[0]), int(position[1])
    elif position == "bottom-right":
        r, c = h - size - margin, w - size - margin
    elif position == "bottom-left":
        r, c = h - size - margin, margin
    elif position == "top-right":
        r, c = margin, w - size - margin
    elif position == "top-left":
        r, c = margin, margin
    elif position == "center":
        r, c = (h - size) // 2, (w - size) // 2
    else:
        raise UnbackdoorError(f"unknown patch position {position!r}; valid: {', '.join(POSITIONS)} or [row, col]")
    if not (0 <= r <= h - size and 0 <= c <= w - size):
        raise UnbackdoorError(f"a {size}x{size} patch at {position} does not fit a {h}x{w} image")
    return r, c


@register
class BadNets(Attack):
    name = "badnets"

    def __init__(self, shape, num_classes, target=0, mode="all-to-one", seed=0, patch_size: int = 3,
                 position: str | list[int] = "bottom-right", color: float | list[float] = 1.0, margin: int = 0):
        super().__init__(shape, num_classes, target, mode, seed)
        c, h, w = self.shape
        if patch_size < 1 or patch_size > min(h, w):
            raise UnbackdoorError(f"patch_size must be in [1, {min(h, w)}], got {patch_size}")
        self.patch_size, self.position, self.margin = int(patch_size), position, int(margin)
        self.origin = patch_origin(position, self.patch_size, h, w, self.margin)
        col = torch.as_tensor(color, dtype=torch.float32).flatten()
        if col.numel() not in (1, c) or col.min() < 0 or col.max() > 1:
            raise UnbackdoorError(f"color must be one value or {c} values in [0, 1], got {color}")
        self.color = col.expand(c).clone()

    def apply(self, x, gen=None):
        r, c = self.origin
        s = self.patch_size
        out = x.clone()
        out[:, :, r : r + s, c : c + s] = self.color.to(x).view(1, -1, 1, 1)
        return out

    def params(self):
        return {"patch_size": self.patch_size, "position": self.position, "color": self.color.tolist(), "margin": self.margin}
