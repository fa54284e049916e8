"""Defenses: pure functions of (model, data, config) -> (model, results).

- :mod:`.bcu` - Backdoor Cleansing with Unlabeled Data (post-training, unlabeled images only).
"""
from .bcu import BCUConfig, BCUResult, bcu_preset, cleanse, distill, layer_schedule, reinitialize, run_bcu  # noqa: F401
from .dbd import (  # noqa: F401
    DBDConfig,
    DBDResult,
    LinearConfig,
    MixMatchConfig,
    SimCLRConfig,
    Split,
    dbd_preset,
    linear_stage,
    mixmatch_stage,
    run_dbd,
    simclr_stage,
    split_by_loss,
)
