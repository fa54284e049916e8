"""Model registry, model directories and helpers that work on any ``nn.Module``."""
from unbackdoor.models import cnn, resnet  # noqa: F401 - they register themselves
from unbackdoor.models.base import Classifier, Normalize
from unbackdoor.models.model_dir import (
    last_linear,
    load_model,
    penultimate_features,
    read_model_meta,
    save_model,
    unwrap,
)
from unbackdoor.models.registry import create, model_names, register

__all__ = [
    "create", "register", "model_names", "Classifier", "Normalize", "save_model", "load_model",
    "read_model_meta", "unwrap", "last_linear", "penultimate_features",
]
