"""BCU: Backdoor Cleansing with Unlabeled Data (Pang et al., CVPR 2023).

:mod:`.distill` (re-initialisation, distillation and :func:`run_bcu`), :mod:`.schedule`
(per-layer probabilities), :mod:`.config` (settings and presets), :mod:`.defense`
(BCU on the defense interface).
"""
from unbackdoor.defenses.bcu.config import BCUConfig, bcu_preset
from unbackdoor.defenses.bcu.defense import BCU
from unbackdoor.defenses.bcu.distill import BCUResult, cleanse, distill, reinitialize, run_bcu
from unbackdoor.defenses.bcu.schedule import layer_schedule

__all__ = ["BCU", "BCUConfig", "BCUResult", "bcu_preset", "cleanse", "distill", "layer_schedule", "reinitialize",
           "run_bcu"]
