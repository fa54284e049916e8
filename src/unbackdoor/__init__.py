"""unbackdoor: defend image classifiers against backdoor attacks (DBD, BCU)."""
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.version import __version__
from unbackdoor.models.model_dir import load_model, save_model

__all__ = ["UnbackdoorError", "load_model", "save_model", "__version__"]
