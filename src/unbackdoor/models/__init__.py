"""Model registry, model directories and helpers that work on any ``nn.Module``."""
from unbackdoor.models import cnn, resnet  # noqa: F401 - they register themselves
from unbackdoor.models.base import Classifier, Normalize
from unbackdoor.models.model_dir import load_model, read_model_meta, save_model
from unbackdoor.models.registry import build_for_data, create, model_names, register

__all__ = ["create", "build_for_data", "register", "model_names", "Classifier", "Normalize", "save_model",
           "load_model", "read_model_meta"]
