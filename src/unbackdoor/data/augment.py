"""Batched, on-device image augmentations.

Every function takes a float batch ``x`` (N, C, H, W) in [0, 1] on any device
and a ``torch.Generator`` on the same device (or None), and draws one set of
random parameters per sample with tensor ops: there is no Python loop over
images, so the hot loop costs a few kernel launches per batch (docs/design.md:
augmentation is batched tensor work, not per-sample PIL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unbackdoor.core.errors import UnbackdoorError


def _rand(n: int, gen: torch.Generator | None, device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 in [0, 1]."""
    return x_u8.float().div_(255)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8, rounded."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random crop of the original size (per sample)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    windows = xp.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2p+1, 2p+1, h, w) views, no copy
    return windows[torch.arange(n, device=x.device), :, dy, dx]  # (n, c, h, w): one gather


def hflip(x: torch.Tensor, p: float = 0.5, gen: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``."""
    if p <= 0:
        return x
    m = _rand(len(x), gen, x.device) < p
    return torch.where(_bcast(m), x.flip(3), x)


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    gen: torch.Generator | None = None,
    out_size: int | None = None,
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` and resize
    back (bilinear), like torchvision's RandomResizedCrop but for a whole batch at once."""
    n, _, h, w = x.shape
    dev = x.device
    area = _rand(n, gen, dev, *scale)
    logr = _rand(n, gen, dev, math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(logr)
    # crop width/height as fractions of the image side; clamp keeps them inside the image
    cw = torch.sqrt(area * r).clamp(max=1.0)
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (_rand(n, gen, dev) * 2 - 1) * (1 - cw)
    cy = (_rand(n, gen, dev) * 2 - 1) * (1 - ch)
    # An axis-aligned crop + bilinear resize is separable: out = My @ x @ Mx^T with one
    # (out, in) interpolation matrix per sample and axis. Same values as
    # affine_grid + grid_sample (bilinear, border, align_corners=False) to float
    # rounding, but faster on CPU, where affine_grid's bmm dominated SimCLR's augmentation
    # (docs/results_dbd.md).
    my = _resize_matrix(cy, ch, h, out_size or h, x.dtype)
    mx = _resize_matrix(cx, cw, w, out_size or w, x.dtype)
    return my[:, None] @ x @ mx.transpose(1, 2)[:, None]


def _resize_matrix(center: torch.Tensor, frac: torch.Tensor, n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, n_out, n_in) bilinear weights sampling the window ``center +- frac`` (normalised
    [-1, 1] coordinates, align_corners=False, border padding) at ``n_out`` points."""
    base = (torch.arange(n_out, device=center.device, dtype=dtype) * 2 + 1) / n_out - 1
    pos = ((frac.to(dtype)[:, None] * base + center.to(dtype)[:, None] + 1) * n_in - 1) / 2
    pos = pos.clamp_(0, n_in - 1)
    p0 = pos.floor()
    w1 = pos - p0
    i0 = p0.long()
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    m = torch.zeros(len(center), n_out, n_in, device=center.device, dtype=dtype)
    m.scatter_add_(2, i0[..., None], (1 - w1)[..., None])
    m.scatter_add_(2, i1[..., None], w1[..., None])
    return m


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, applied to each image with prob ``p``.

    Factors are drawn as in torchvision (uniform in [1-v, 1+v], hue in [-h, h]);
    hue is a rotation in YIQ space (cheap, batched). On 1-channel images,
    saturation and hue have no effect.
    """
    n, dev = len(x), x.device
    apply = _bcast(_rand(n, gen, dev) < p)
    out = x
    if brightness > 0:
        out = out * _bcast(_rand(n, gen, dev, 1 - brightness, 1 + brightness))
    if contrast > 0:
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        f = _bcast(_rand(n, gen, dev, 1 - contrast, 1 + contrast))
        out = (out - mean) if out is x else out.sub_(mean)  # in place once ``out`` is our own buffer
        out = out.mul_(f).add_(mean)
    if x.shape[1] == 3:
        if saturation > 0:
            g = _gray(out)
            f = _bcast(_rand(n, gen, dev, 1 - saturation, 1 + saturation))
            out = (out - g) * f + g
        if hue > 0:
            out = _hue_rotate(out, _rand(n, gen, dev, -hue, hue) * 2 * math.pi)
    out = out.clamp(0, 1) if out is x else out.clamp_(0, 1)
    return torch.where(apply, out, x)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    m = _RGB2YIQ.to(x)
    minv = torch.linalg.inv(m)
    cos, sin = torch.cos(angle), torch.sin(angle)
    n = len(x)
    rot = torch.zeros(n, 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1] = cos
    rot[:, 1, 2] = -sin
    rot[:, 2, 1] = sin
    rot[:, 2, 2] = cos
    t = minv @ rot @ m  # (n,3,3)
    return torch.einsum("nij,njhw->nihw", t, x)


def random_grayscale(x: torch.Tensor, p: float = 0.2, gen: torch.Generator | None = None) -> torch.Tensor:
    if x.shape[1] == 1 or p <= 0:
        return x
    m = _bcast(_rand(len(x), gen, x.device) < p)
    return torch.where(m, _gray(x).expand_as(x), x)


def gaussian_blur(
    x: torch.Tensor,
    p: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_frac: float = 0.1,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma; kernel ~10% of the image side (SimCLR)."""
    n, c, h, w = x.shape
    if n == 0:  # a grouped conv with 0 groups is an error; every other augmentation passes empty batches through
        return x
    k = max(3, int(kernel_frac * min(h, w)) // 2 * 2 + 1)
    s = _rand(n, gen, x.device, *sigma)
    s = torch.where(_rand(n, gen, x.device) < p, s, torch.zeros_like(s))
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    ker = torch.exp(-(r[None, :] ** 2) / (2 * s[:, None].clamp(min=1e-3) ** 2))
    # sigma 0 means "no blur": a delta kernel
    delta = (r == 0).to(x.dtype)[None, :].expand(n, k)
    ker = torch.where((s > 0)[:, None], ker, delta)
    ker = ker / ker.sum(1, keepdim=True)
    ker = ker.repeat_interleave(c, 0)  # (n*c, k)
    xr = x.reshape(1, n * c, h, w)
    xr = F.conv2d(F.pad(xr, (k // 2, k // 2, 0, 0), mode="reflect"), ker[:, None, None, :], groups=n * c)
    xr = F.conv2d(F.pad(xr, (0, 0, k // 2, k // 2), mode="reflect"), ker[:, None, :, None], groups=n * c)
    return xr.reshape(n, c, h, w)


def random_noise(
    x: torch.Tensor, offset: float = 0.2, std: float = 0.05, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Random global brightness offset plus Gaussian pixel noise.

    Not in the SimCLR paper: without it the
    self-supervised features of Blended-poisoned images can cluster (a blend is a
    global brightness/pattern shift); randomising both breaks that shortcut.
    """
    n = len(x)
    off = _bcast(_rand(n, gen, x.device, -offset, offset))
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return noise.mul_(std).add_(x + off).clamp_(0, 1)  # in place, same values as (x + off + noise * std)


def _check_range(setting: str, value: float, hi: float, what: str) -> None:
    if not 0 <= value <= hi:
        raise UnbackdoorError(f"{setting} must be {what} in [0, {hi:g}], got {value}")


def check_patches(where: str, p: float) -> None:
    """Validate the ``patches`` setting (a probability) of a config section ``where``."""
    _check_range(f"{where}.patches", p, 1, "a probability")


def random_patches(
    x: torch.Tensor,
    p: float = 0.5,
    count: int = 4,
    size: tuple[float, float] = (0.07, 0.22),
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Paste up to ``count`` random binary (salt-and-pepper) squares on each image with
    probability ``p``: each square's side is a fraction in ``size`` of the image side
    (rounded, >= 2 px: 2-6 px on 28x28), its position uniform; overlapping squares merge.

    Not in the DBD or MixMatch papers. DBD's addition against clean-label patch
    triggers (docs/results_dbd.md): a Label-Consistent poison keeps its correct label
    and its loss is low, so it stays labelled and MixMatch learns its corner patch
    as the target class; random local patches on images of every class make such a
    patch uninformative.
    """
    n, c, h, w = x.shape
    dev = x.device
    on = _rand(n, gen, dev) < p
    lo, hi = (max(2, round(f * min(h, w))) for f in size)  # integer sides: 2-6 px on 28x28, 2-7 on 32x32
    s = (lo + _rand(n * count, gen, dev) * (hi + 1 - lo)).floor().clamp(max=min(h, w)).view(n, count)
    r = (_rand(n * count, gen, dev) * (h - s.view(-1) + 1)).floor().view(n, count)
    q = (_rand(n * count, gen, dev) * (w - s.view(-1) + 1)).floor().view(n, count)
    rows = torch.arange(h, device=dev, dtype=s.dtype).view(1, 1, h)
    cols = torch.arange(w, device=dev, dtype=s.dtype).view(1, 1, w)
    in_rows = ((rows >= r[..., None]) & (rows < (r + s)[..., None])).to(x.dtype)  # (n, count, h)
    in_cols = ((cols >= q[..., None]) & (cols < (q + s)[..., None])).to(x.dtype)  # (n, count, w)
    inside = (in_rows.transpose(1, 2) @ in_cols) > 0  # (n, h, w): covered by any square (separable)
    pattern = random_bits((n, c, h, w), gen, dev).to(x.dtype)
    return torch.where((inside & on.view(n, 1, 1))[:, None], pattern, x)


def random_bits(shape: tuple[int, ...], gen: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Fair random bits: a uint8 tensor of ``shape`` with values in {0, 1}.

    Unpacks random bytes (8 bits each) instead of drawing one float per bit: an
    eighth as many random values, and the float draw was a large part of stage 3's
    patch cost on CPU (evidence: docs/results_dbd.md, Benchmark, 2026-12-01).
    """
    m = math.prod(shape)
    byte = torch.randint(0, 256, ((m + 7) // 8,), generator=gen, device=device, dtype=torch.uint8)
    # bit k of each byte via a mask, not a shift: bitwise_and exists for uint8 on every backend
    masks = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], device=byte.device, dtype=torch.uint8)
    return (byte[:, None] & masks).ne_(0).view(-1)[:m].view(shape).to(torch.uint8)


@dataclass
class SimCLRAugment:
    """One SimCLR view (docs/design.md, DBD stage 1): RandomResizedCrop(0.2-1), optional flip,
    ColorJitter(0.4,0.4,0.4,0.1) p=0.8, grayscale p=0.2, Gaussian blur p=0.5,
    plus the optional noise augmentation."""

    scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    noise: bool = False
    noise_offset: float = 0.2
    noise_std: float = 0.05

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = random_resized_crop(x, self.scale, gen=gen)
        if self.flip:
            x = hflip(x, 0.5, gen)
        x = color_jitter(x, *self.jitter, p=self.jitter_p, gen=gen)
        x = random_grayscale(x, self.gray_p, gen)
        if self.blur_p > 0:
            x = gaussian_blur(x, self.blur_p, gen=gen)
        if self.noise:
            x = random_noise(x, self.noise_offset, self.noise_std, gen)
        return x


@dataclass
class WeakAugment:
    """Standard supervised / MixMatch weak augmentation: random crop with padding
    (1/8 of the side, 4 px on 32x32) and optional horizontal flip."""

    padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.padding, gen)
        if self.flip:
            x = hflip(x, 0.5, gen)
        return x


def weak_augment_for(meta: dict, image_size: int) -> WeakAugment:
    """The usual weak augmentation for a dataset: pad = size/8, flip only where valid."""
    return WeakAugment(padding=max(1, image_size // 8), flip=bool(meta.get("flip", False)))


def check_grating(where: str, amplitude: float, p: float) -> None:
    """Validate the ``grating`` / ``grating_p`` settings of a config section ``where``."""
    _check_range(f"{where}.grating", amplitude, 1, "an amplitude")
    _check_range(f"{where}.grating_p", p, 1, "a probability")


def random_grating(
    x: torch.Tensor, amplitude: float = 0.5, p: float = 0.5, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Add a random sinusoidal grating ``a * sin(2 pi f (u cos t + v sin t) + phase)`` to
    each image with probability ``p``: amplitude ``a`` in [0, amplitude], orientation
    ``t`` in [0, pi), ``f`` in [1, side / 3] cycles per image, random phase; clamped to [0, 1].

    Not in the SimCLR or MixMatch papers. DBD's additions (docs/results_dbd.md): a
    clean-label SIG trigger (a fixed sinusoid on every target-class image) is
    otherwise a perfect, label-consistent shortcut that both the self-supervised
    features and the fine-tuned model pick up; gratings of random frequency and
    orientation on every class make additive periodic patterns uninformative.
    """
    n, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    on = (_rand(n, gen, dev) < p).to(dt)
    amp = _rand(n, gen, dev) * amplitude * on
    theta = _rand(n, gen, dev) * math.pi
    freq = 1 + _rand(n, gen, dev) * (min(h, w) / 3 - 1)
    phase = _rand(n, gen, dev) * 2 * math.pi
    v = (torch.arange(h, device=dev, dtype=dt) / h).view(1, h, 1)
    u = (torch.arange(w, device=dev, dtype=dt) / w).view(1, 1, w)
    arg = u * theta.cos().view(n, 1, 1) + v * theta.sin().view(n, 1, 1)  # (n, h, w); then in place, same values
    arg = arg.mul_(2 * math.pi * freq.view(n, 1, 1)).add_(phase.view(n, 1, 1)).sin_()
    return (x + arg.mul_(amp.view(n, 1, 1))[:, None]).clamp_(0, 1)


def check_warp(where: str, strength: float, p: float) -> None:
    """Validate the ``warp`` / ``warp_p`` settings of a config section ``where``."""
    _check_range(f"{where}.warp", strength, 4, "a strength")
    _check_range(f"{where}.warp_p", p, 1, "a probability")


def random_warp(
    x: torch.Tensor, strength: float = 1.0, p: float = 0.5, grid: tuple[int, int] = (2, 6),
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """A random smooth (elastic) warp on each image with probability ``p``.

    Per image: a ``k x k`` field of random 2-D displacements (``k`` uniform in ``grid``),
    normalised to mean absolute value 1, bicubically upsampled to the image and scaled so
    that its mean displacement is up to ``strength / 2`` pixels (uniform in [0, strength]
    times half a pixel); the image is resampled bilinearly at the displaced positions.
    Elastic distortion is a classic augmentation of handwritten digits (Simard et al.,
    2003). Not in the BCU paper: BCU's addition against warp triggers (WaNet's field is
    the same family at strength 0.5, docs/results_bcu.md).
    """
    n, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    lo, hi = grid
    k = int(lo + torch.randint(0, hi - lo + 1, (1,), generator=gen, device=dev).item())  # one k a batch: one upsample
    field = torch.rand(n, 2, k, k, generator=gen, device=dev, dtype=torch.float32) * 2 - 1
    field = field / field.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
    on = (_rand(n, gen, dev) < p).float()
    scale = _rand(n, gen, dev) * strength * on  # mean |displacement| in half pixels
    # normalised coordinates span 2 per side: one pixel is 2 / side
    field = field * (scale.view(n, 1, 1, 1) / max(h, w))
    ys = torch.linspace(-1, 1, h, device=dev)
    xs = torch.linspace(-1, 1, w, device=dev)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack((xx, yy), -1)[None]  # (1, h, w, 2), grid_sample's (x, y) order
    g = (base + field.permute(0, 2, 3, 1)).clamp_(-1, 1)
    return F.grid_sample(x.float(), g, mode="bilinear", padding_mode="border", align_corners=True).clamp_(0, 1).to(dt)
