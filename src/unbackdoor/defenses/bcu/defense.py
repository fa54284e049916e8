"""BCU on the defense interface: cleanses a suspicious trained model with unlabeled images."""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

from unbackdoor.core.config import override
from unbackdoor.core.files import read_yaml
from unbackdoor.defenses.base import Defense, DefenseInputs, DefenseResult, Progress, register_defense
from unbackdoor.defenses.bcu.config import BCUConfig, bcu_preset, resolve_epochs
from unbackdoor.defenses.bcu.distill import run_bcu


class BCU(Defense):
    name, label, config_type, needs = "bcu", "BCU", BCUConfig, ("model", "unlabeled")
    summary = "BCU: cleanse a suspicious model with unlabeled data"
    description = (
        "Backdoor Cleansing with Unlabeled Data (Pang et al., CVPR 2023): partially re-initialise the model (more "
        "in deeper layers) and distil the suspicious model into it on unlabeled images. Writes the cleansed model "
        "directory at OUT (model.safetensors + model.json) with config.yaml, schedule.json, history.json, "
        "metrics.json and checkpoint.pt.")
    preset_of, history_stage, featured = staticmethod(bcu_preset), "distillation", True

    def load_config(self, preset: str, path: str | os.PathLike | None) -> BCUConfig:
        cfg = super().load_config(preset, path)
        if path is not None:
            data = read_yaml(path)
            data = data.get(self.name, data) if isinstance(data.get(self.name), dict) else data
            if "epochs" in data and "steps" not in data:  # a length in epochs replaces the preset's step budget
                cfg = replace(cfg, steps=None)
        return cfg

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--schedule", metavar="FILE.yaml",
                       help="explicit per-layer re-initialisation probabilities: a mapping of module-name glob "
                       "patterns to p (last match wins), e.g. 'backbone.0: 0.05'")
        p.add_argument("--p-scale", type=float, help="multiply every rule-derived probability (default 1)")
        p.add_argument("--rule", choices=("auto", "stages", "depth"),
                       help="layer schedule rule: stages (paper, ResNet-like), depth (any model), auto (default)")
        p.add_argument("--ablation", choices=("none", "no-reinit", "pseudo-label"),
                       help="none (BCU), no-reinit (distil an exact copy), pseudo-label (fine-tune the model on its "
                       "own labels); same budget")
        p.add_argument("--epochs", type=int, help="distillation epochs (replaces the preset's step budget)")
        p.add_argument("--steps", type=int, help="optimiser steps in all, whatever the pool's size (quick: 4800)")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)

    def configure(self, cfg: BCUConfig, args: argparse.Namespace) -> BCUConfig:
        cli = {"p_scale": args.p_scale, "rule": args.rule, "ablation": args.ablation, "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr}
        cfg = override(cfg, {k: v for k, v in cli.items() if v is not None}, where="bcu")
        if args.steps is not None or args.epochs is not None:  # an explicit length on the command line wins
            cfg = replace(cfg, steps=args.steps)
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
