"""unbackdoor: defend image classifiers against backdoor attacks (DBD, BCU)."""
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.models.model_dir import load_model, save_model

__version__ = "0.1.0"
__all__ = ["UnbackdoorError", "load_model", "save_model", "__version__"]
