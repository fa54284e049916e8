"""Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha t with a full-image trigger t.

The trigger is an image file (resized to the input) or, by default, a seeded
uniform-noise pattern (the paper's random-pattern variant)."""
from __future__ import annotations

import numpy as np
import torch

from unbackdoor.attacks.base import Attack, register
from unbackdoor.core.errors import UnbackdoorError


def load_trigger_image(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Read an image (or .npy) file as float (C, H, W) in [0, 1], resized to ``shape``."""
    from pathlib import Path

    import torch.nn.functional as F

    p = Path(path)
    if not p.is_file():
        raise UnbackdoorError(f"trigger file not found: {p}")
    c, h, w = shape
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False).astype(np.float32)
        except Exception as e:  # noqa: BLE001
            raise UnbackdoorError(f"cannot read trigger {p}: {e}") from None
        if arr.max() > 1:
            arr = arr / 255.0
        t = torch.from_numpy(arr)
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
    else:
        from PIL import Image

        try:
            with Image.open(p) as im:
                im = im.convert("L" if c == 1 else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:  # noqa: BLE001
            raise UnbackdoorError(f"cannot read trigger image {p}: {e}") from None
        t = torch.from_numpy(arr)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != c:
        t = t.mean(0, keepdim=True).expand(c, -1, -1) if c == 3 or t.shape[0] == 3 else t.expand(c, -1, -1)
    if tuple(t.shape[1:]) != (h, w):
        t = F.interpolate(t[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    return t.clamp(0, 1).contiguous()


@register
class Blended(Attack):
    name = "blended"

    def __init__(self, shape, num_classes, target=0, mode="all-to-one", seed=0, alpha: float = 0.2, trigger: str | None = None,
                 _restoring: bool = False):
        super().__init__(shape, num_classes, target, mode, seed)
        if not 0 < alpha <= 1:
            raise UnbackdoorError(f"blend alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.trigger_path = trigger
        if trigger is not None and not _restoring:
            self.pattern = load_trigger_image(trigger, self.shape)
        else:
            g = torch.Generator().manual_seed(1000 + self.seed)
            self.pattern = torch.rand(self.shape, generator=g)

    def apply(self, x, gen=None):
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x)

    def params(self):
        return {"alpha": self.alpha, "trigger": self.trigger_path}

    def tensors(self):
        return {"pattern": self.pattern}
