"""DBD: Backdoor Defense via Decoupling the Training Process (Huang et al., ICLR 2022).

:mod:`.stages` (the three stages and :func:`run_dbd`), :mod:`.config` (settings and
presets), :mod:`.split` (the per-epoch loss split and detection), :mod:`.losses`,
:mod:`.defense` (DBD on the defense interface).
"""
from unbackdoor.defenses.dbd.config import DBDConfig, LinearConfig, MixMatchConfig, SimCLRConfig, dbd_preset
from unbackdoor.defenses.dbd.defense import DBD
from unbackdoor.defenses.dbd.split import Split, split_by_loss
from unbackdoor.defenses.dbd.stages import DBDResult, linear_stage, mixmatch_stage, run_dbd, simclr_stage

__all__ = ["DBD", "DBDConfig", "DBDResult", "LinearConfig", "MixMatchConfig", "SimCLRConfig", "Split", "dbd_preset",
           "linear_stage", "mixmatch_stage", "run_dbd", "simclr_stage", "split_by_loss"]
