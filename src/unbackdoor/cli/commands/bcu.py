"""unbackdoor bcu: cleanse a suspicious model with unlabeled images (BCU, CVPR 2023)."""
from __future__ import annotations

import argparse

from unbackdoor.cli.commands.common import (
    add_engine_args,
    add_out_args,
    engine_options,
    print_json,
    print_table,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bcu", help="cleanse a suspicious model with unlabeled data (BCU)",
        description="Backdoor Cleansing with Unlabeled Data: partially re-initialise the model (more in deeper "
        "layers) and distil the suspicious model into it on unlabeled images. Writes the cleansed model "
        "directory at OUT (model.safetensors + model.json) with config.yaml, schedule.json, history.json, "
        "metrics.json and checkpoint.pt.")
    p.add_argument("--model", required=True,
                   help="model directory (model.safetensors + model.json) or BackdoorBench attack_result.pt "
                   "(read without executing code)")
    p.add_argument("--unlabeled", required=True, metavar="SRC",
                   help="unlabeled images: a poisoned-data directory (its clean heldout split; labels ignored), an "
                   ".npz, an image folder, or a dataset name (its training split, e.g. 'digits' as "
                   "out-of-distribution data); converted to the model's channels and size")
    p.add_argument("--fit", choices=("resize", "pad"), default="resize",
                   help="how unlabeled images of another size are fitted: resize (stretch) or pad (resize to 5/7 of "
                   "the side and zero-pad, MNIST framing) (default: resize)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="allow horizontal flips of the unlabeled images (default: the dataset's own setting; "
                   "off for files and folders)")
    add_out_args(p)
    p.add_argument("--data", help="poisoned-data directory: report clean accuracy / ASR / robust accuracy before and "
                   "after, and DER")
    p.add_argument("--preset", choices=("paper", "quick"), default="paper",
                   help="paper: the paper's settings (100 epochs, batch 256); quick: 4,800 steps at batch 32 on a CPU "
                   "(default: paper)")
    p.add_argument("--config", help="YAML file overriding BCUConfig keys (or a 'bcu:' section), e.g. "
                   "p_overrides: {'backbone.layer4.*': 0.3}")
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
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print metrics.json")
    add_engine_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from unbackdoor.core.config import load_config, override
    from unbackdoor.core.files import read_yaml
    from unbackdoor.defenses.bcu.distill import bcu_preset, cleanse

    cfg = load_config(bcu_preset(args.preset), args.config, section="bcu")
    cli = {"p_scale": args.p_scale, "rule": args.rule, "ablation": args.ablation, "epochs": args.epochs,
           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    cfg = override(cfg, {k: v for k, v in cli.items() if v is not None}, where="bcu")
    if args.steps is not None or args.epochs is not None:  # an explicit length on the command line wins
        cfg = replace(cfg, steps=args.steps)
    if args.schedule:
        sched = read_yaml(args.schedule)
        if "p_overrides" in sched and isinstance(sched["p_overrides"], dict):
            sched = sched["p_overrides"]
        cfg = override(cfg, {"p_overrides": {**cfg.p_overrides, **{str(k): v for k, v in sched.items()}}}, where="bcu")
    cfg = override(cfg, {"engine": vars(engine_options(args))}, where="bcu")
    cfg.validate()
    res = cleanse(args.model, args.unlabeled, args.out, cfg, data=args.data, resume=args.resume, force=args.force,
                  fit=args.fit, flip=args.flip)
    m = res.metrics
    if args.json:
        print_json(m)
        return 0
    if "before" in m:
        cols = [c for c in ("clean_accuracy", "attack_success_rate", "robust_accuracy") if c in m["after"]]
        print_table([{"model": "before (suspicious)", **m["before"]}, {"model": f"after (bcu{'' if m['ablation'] == 'none' else ', ' + m['ablation']})", **m["after"]}],
                    ["model", *cols])
        if "der" in m:
            print(f"DER {m['der']:.3f}  ", end="")
    print(f"distillation {m['distill_seconds']:.1f}s, {m['n_unlabeled']} unlabeled images, {m['precision']}")
    print(f"wrote {args.out}")
    return 0
