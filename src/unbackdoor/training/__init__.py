"""The shared training loop: device, precision, checkpoints, resume, progress, DDP."""
from .checkpoint import load_checkpoint, save_checkpoint
from .device import Precision, pick_device, probe_precision, resolve_precision
from .distributed import DistContext, current_context, init_distributed
from .engine import Engine, EngineOptions, make_optimizer, make_scheduler, set_seed
from .fit import TrainConfig, TrainResult, fit

__all__ = [
    "Engine", "EngineOptions", "TrainConfig", "TrainResult", "fit", "set_seed", "pick_device", "Precision",
    "probe_precision", "resolve_precision", "DistContext", "init_distributed", "current_context",
    "save_checkpoint", "load_checkpoint", "make_optimizer", "make_scheduler",
]
