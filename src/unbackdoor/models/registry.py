"""One registry for model architectures: ``create(name, num_classes, in_channels, image_size)``."""
from __future__ import annotations

from typing import Callable

from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.registry import Registry

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register(name: str):
    """Decorator: register a model factory under ``name``."""

    def deco(fn):
        _MODELS.add(name, fn, replace=True)
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_MODELS.names())


def create(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kw) -> nn.Module:
    """Build a registered model. Inputs to the model are float images in [0, 1]."""
    factory = _MODELS.get(name)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
    except ValueError as e:
        raise UnbackdoorError(str(e)) from None
    model.arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, **kw}
    return model


def build_for_data(name: str, data) -> nn.Module:
    """A fresh registry model for the images and classes of ``data`` (an ``ImageDataset``)."""
    c, h, w = data.shape
    if h != w:
        raise UnbackdoorError(f"models expect square images, got {h}x{w}")
    return create(name, num_classes=data.num_classes, in_channels=c, image_size=h)
