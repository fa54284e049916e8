"""cnn-small: three 3x3 conv blocks (16-32-64) with BatchNorm, max-pool after each,
flattened features. Fast on CPU; the default for 28x28 digits.

Flattened (not global-average-pooled) features keep spatial position; the
global pooling keeps exactly the global brightness a blend changes, which
made DBD fail on Blended.
"""
from __future__ import annotations

from torch import nn

from unbackdoor.models.base import Classifier, default_stats
from unbackdoor.models.registry import register


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]


@register("cnn-small")
def cnn_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, mean=None, std=None, width: int = 16) -> Classifier:
    w = width
    backbone = nn.Sequential(*_block(in_channels, w), *_block(w, 2 * w), *_block(2 * w, 4 * w), nn.Flatten())
    side = image_size // 2 // 2 // 2
    if side < 1:
        raise ValueError(f"cnn-small needs image_size >= 8, got {image_size}")
    m, s = default_stats(in_channels)
    return Classifier(backbone, 4 * w * side * side, num_classes, mean or m, std or s)
