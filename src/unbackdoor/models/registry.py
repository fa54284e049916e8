"""One registry for model architectures: ``create(name, num_classes, in_channels, image_size)``."""
from __future__ import annotations

from typing import Callable

from torch import nn

from unbackdoor.core.errors import UnbackdoorError, unknown_name

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: register a model factory under ``name``."""

    def deco(fn):
        _MODELS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_MODELS)


def create(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kw) -> nn.Module:
    """Build a registered model. Inputs to the model are float images in [0, 1]."""
    if name not in _MODELS:
        raise unknown_name("model", name, model_names())
    try:
        model = _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
    except ValueError as e:
        raise UnbackdoorError(str(e)) from None
    model.arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, **kw}
    return model
