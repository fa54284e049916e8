"""BCU on the defense interface: cleanses a suspicious trained model with unlabeled images."""
from __future__ import annotations

import argparse
import os

from unbackdoor.core.config import override
from unbackdoor.core.files import read_yaml
from unbackdoor.defenses.base import Defense, DefenseInputs, DefenseResult, Flag, Progress, register_defense
from unbackdoor.defenses.bcu.config import ABLATIONS, RULES, BCUConfig, bcu_preset, resolve_epochs
from unbackdoor.defenses.bcu.distill import run_bcu
from unbackdoor.defenses.posttrain import TRAINING_FLAGS


class BCU(Defense):
    """Backdoor Cleansing with Unlabeled Data (Pang et al., CVPR 2023): partially re-initialise the model (more
    in deeper layers) and distil the suspicious model into it on unlabeled images. Writes the cleansed model
    directory at OUT (model.safetensors + model.json) with config.yaml, schedule.json, history.json,
    metrics.json and checkpoint.pt."""

    name, label, config_type, needs = "bcu", "BCU", BCUConfig, ("model", "unlabeled")
    summary = "BCU: cleanse a suspicious model with unlabeled data"
    preset_of, history_stage, featured = staticmethod(bcu_preset), "distillation", True
    budget_keys = ("epochs", "steps")
    flags = (
        Flag("--p-scale", "multiply every rule-derived probability (default 1)", float),
        Flag("--rule", "layer schedule rule: stages (paper, ResNet-like), depth (any model), auto (default)",
             choices=RULES),
        Flag("--ablation", "none (BCU), no-reinit (distil an exact copy), pseudo-label (fine-tune the model on its "
             "own labels); same budget", choices=ABLATIONS),
        *TRAINING_FLAGS,
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--schedule", metavar="FILE.yaml",
                       help="explicit per-layer re-initialisation probabilities: a mapping of module-name glob "
                       "patterns to p (last match wins), e.g. 'backbone.0: 0.05'")
        super().add_arguments(p)

    def configure(self, cfg: BCUConfig, args: argparse.Namespace) -> BCUConfig:
        cfg = super().configure(cfg, args)
        if args.schedule:
            sched = read_yaml(args.schedule)
            if "p_overrides" in sched and isinstance(sched["p_overrides"], dict):
                sched = sched["p_overrides"]
            cfg = override(cfg, {"p_overrides": {**cfg.p_overrides, **{str(k): v for k, v in sched.items()}}},
                           where="bcu")
        return cfg

    def describe(self, cfg: BCUConfig, inputs: DefenseInputs) -> str:
        n = len(inputs.unlabeled) if inputs.unlabeled is not None else 0
        return (f"distil the undefended model into a re-initialised copy, {resolve_epochs(cfg, n).epochs} epochs on "
                f"{n} unlabeled images")

    def run(self, inputs: DefenseInputs, cfg: BCUConfig, out_dir: str | os.PathLike, *, resume: bool = False,
            force: bool = False, progress: Progress | None = None) -> DefenseResult:
        self.check(inputs)
        res = run_bcu(inputs.model, inputs.unlabeled, cfg, out_dir, resume=resume, test=inputs.test,
                      attack=inputs.attack, force=force, provenance=inputs.provenance or None)
        return DefenseResult(res.model, res.metrics, res)


register_defense(BCU())
