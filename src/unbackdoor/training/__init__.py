"""The shared training loop: device, precision, checkpoints, resume, progress, DDP."""
from unbackdoor.training.checkpoint import load_checkpoint, save_checkpoint
from unbackdoor.training.device import Precision, pick_device, probe_precision, resolve_precision
from unbackdoor.training.distributed import DistContext, current_context, init_distributed
from unbackdoor.training.engine import Engine, EngineOptions, make_optimizer, make_scheduler, set_seed
from unbackdoor.training.fit import TrainConfig, TrainResult, fit
from unbackdoor.training.loop import run_epochs

__all__ = [
    "Engine", "EngineOptions", "TrainConfig", "TrainResult", "fit", "set_seed", "pick_device", "Precision",
    "probe_precision", "resolve_precision", "DistContext", "init_distributed", "current_context",
    "save_checkpoint", "load_checkpoint", "make_optimizer", "make_scheduler", "run_epochs",
]
