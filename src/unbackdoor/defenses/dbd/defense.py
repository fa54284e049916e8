"""DBD on the defense interface: trains a model from scratch on the labelled, possibly poisoned training set."""
from __future__ import annotations

import os
from typing import Any

from unbackdoor.defenses.base import Defense, DefenseInputs, DefenseResult, Progress, register_defense
from unbackdoor.defenses.dbd.config import DBDConfig, dbd_preset
from unbackdoor.defenses.dbd.stages import epoch_iterations, run_dbd
from unbackdoor.models.registry import build_for_data
from unbackdoor.training.engine import set_seed

_STAGES = ("simclr", "linear", "mixmatch", "polish")


def _stage_costs(cfg: DBDConfig, n: int) -> dict[str, float]:
    """Relative cost of one epoch of each stage (images processed, weighted by the
    measured cost per image of each stage), so progress does not count a SimCLR
    epoch like a linear-head epoch."""
    s, mm = cfg.simclr, cfg.mixmatch
    return {"simclr": 2.0 * (n // s.batch_size) * s.batch_size, "linear": 1.4 * n,
            "mixmatch": epoch_iterations(mm, int(mm.epsilon * n)) * mm.batch_size * 1.75, "polish": 0.9 * n}


class DBD(Defense):
    name = "dbd"
    label = "DBD"
    config_type = DBDConfig
    needs = ("train_set",)
    summary = "DBD: train a clean model on possibly poisoned labelled data and flag the poisoned samples"
    description = (
        "Backdoor Defense via Decoupling the Training Process (Huang et al., ICLR 2022): SimCLR backbone without "
        "labels, a linear head on the frozen backbone (SCE), then MixMatch fine-tuning on the low-loss half as "
        "labelled data; then (not in the paper) a short supervised polish on the labels the model trusts. Writes the model directory (model.safetensors + model.json) at OUT, checkpoints/, "
        "config.yaml, metrics.json, detection.csv/.json and history.json.")
    preset_of = staticmethod(dbd_preset)
    featured = True

    def describe(self, cfg: DBDConfig, inputs: DefenseInputs) -> str:
        polish = f" → polish {cfg.polish.epochs} ep" if cfg.polish.epochs > 0 else ""
        return (f"SimCLR {cfg.simclr.epochs} ep → linear head ≤{cfg.linear.epochs} ep → "
                f"MixMatch ≤{cfg.mixmatch.epochs} ep{polish}")

    def run(self, inputs: DefenseInputs, cfg: DBDConfig, out_dir: str | os.PathLike, *, resume: bool = False,
            force: bool = False, progress: Progress | None = None) -> DefenseResult:
        self.check(inputs)
        train = inputs.train
        cost = _stage_costs(cfg, len(train))
        epochs = {"simclr": cfg.simclr.epochs, "linear": cfg.linear.epochs, "mixmatch": cfg.mixmatch.epochs,
                  "polish": cfg.polish.epochs}
        total = sum(cost[k] * epochs[k] for k in _STAGES)

        def on_epoch(stage: str, rec: dict[str, Any]) -> None:
            if progress is None:
                return
            bits = [f"{stage} {rec.get('epoch', '?')}/{epochs.get(stage, '?')}"]
            for k, short in (("loss", "loss"), ("clean_accuracy", "BA"), ("attack_success_rate", "ASR")):
                if isinstance(rec.get(k), (int, float)):
                    bits.append(f"{short} {rec[k]:.3g}")
            # Absolute position: earlier stages count as complete (the head may stop early).
            i = _STAGES.index(stage) if stage in _STAGES else len(_STAGES)
            done = sum(cost[k] * epochs[k] for k in _STAGES[:i])
            ep = rec.get("epoch")
            done += cost.get(stage, 0.0) * (ep if isinstance(ep, (int, float)) else 1)
            progress(min(1.0, done / total), " · ".join(bits))

        if inputs.model is not None:
            model = inputs.model
        else:
            set_seed(cfg.seed)
            model = build_for_data(inputs.arch, train)
        res = run_dbd(model, train, cfg, out_dir, resume=resume, force=force, on_epoch=on_epoch,
                      provenance=inputs.provenance or None, test=inputs.test, attack=inputs.attack)
        return DefenseResult(res.model, res.metrics, res)


register_defense(DBD())
