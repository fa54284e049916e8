"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible elastic warp.

A random k x k flow field is upsampled to the image and scaled by s; the
poisoned image is ``grid_sample(x, identity + s * flow / H)``. Noise mode
(cross ratio 2): as many as twice the poisoned count of other samples get the
warp plus random per-sample noise and keep their labels, so the network must
learn the exact warp, not "any warp"."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unbackdoor.attacks.base import Attack, register
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.data.augment import to_float, to_uint8


@register
class WaNet(Attack):
    name = "wanet"
    train_epochs = 30  # a warp is learned slowly: 12 epochs leave the backdoor incomplete (README, Attacks)

    def __init__(self, shape, num_classes, target=0, mode="all-to-one", seed=0, k: int = 4, s: float = 0.5,
                 grid_rescale: float = 1.0, cross_ratio: float = 2.0):
        super().__init__(shape, num_classes, target, mode, seed)
        _, h, w = self.shape
        if h != w:
            raise UnbackdoorError(f"WaNet expects square images, got {h}x{w}")
        if k < 2 or k > h:
            raise UnbackdoorError(f"WaNet grid size k must be in [2, {h}], got {k}")
        self.k, self.s, self.grid_rescale, self.cross_ratio = int(k), float(s), float(grid_rescale), float(cross_ratio)
        g = torch.Generator().manual_seed(2000 + self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        self.noise_grid = F.interpolate(ins, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
        arr = torch.linspace(-1, 1, h)
        xx, yy = torch.meshgrid(arr, arr, indexing="ij")
        self.identity_grid = torch.stack((yy, xx), 2)

    def _grid(self, device, dtype) -> torch.Tensor:
        h = self.shape[1]
        grid = (self.identity_grid + self.s * self.noise_grid / h) * self.grid_rescale
        return grid.clamp(-1, 1).to(device=device, dtype=dtype)

    def apply(self, x, gen=None):
        grid = self._grid(x.device, x.dtype)[None].expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def apply_noise(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """The noise-mode warp: the backdoor grid plus random per-sample jitter."""
        h = self.shape[1]
        grid = self._grid(x.device, x.dtype)[None].expand(len(x), -1, -1, -1)
        jitter = (torch.rand(len(x), h, h, 2, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) / h
        return F.grid_sample(x, (grid + jitter).clamp(-1, 1), align_corners=True).clamp(0, 1)

    def _extra_poison(self, ds, mask, gen: np.random.Generator) -> None:
        if self.cross_ratio <= 0:
            return
        free = np.flatnonzero(~mask.numpy())
        n = min(len(free), int(round(self.cross_ratio * int(mask.sum()))))
        idx = torch.as_tensor(np.sort(gen.choice(free, size=n, replace=False)))
        g = torch.Generator().manual_seed(int(gen.integers(2**31)))
        ds.images[idx] = to_uint8(self.apply_noise(to_float(ds.images[idx]), g))
        noise_mask = torch.zeros(len(ds), dtype=torch.bool)
        noise_mask[idx] = True
        ds.meta["noise_mask"] = noise_mask

    def params(self):
        return {"k": self.k, "s": self.s, "grid_rescale": self.grid_rescale, "cross_ratio": self.cross_ratio}

    def tensors(self):
        return {"noise_grid": self.noise_grid}
