"""The common shape of our models: normalise -> backbone -> linear classifier.

Normalisation lives inside the model, so every model takes float images in
[0, 1] (N, C, H, W). ``features(x)`` returns the penultimate representation
(what DBD's SimCLR stage trains and the report's t-SNE plots).
"""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize -> backbone (-> flat features of size ``feature_dim``) -> fc."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def default_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """Neutral normalisation (0.5 / 0.25) when no dataset statistics are given."""
    return [0.5] * in_channels, [0.25] * in_channels
