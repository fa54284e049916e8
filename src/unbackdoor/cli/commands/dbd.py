"""unbackdoor dbd: train a clean model on possibly poisoned labelled data (DBD)."""
from __future__ import annotations

import argparse

from unbackdoor.cli.commands.common import (
    add_engine_args,
    add_out_args,
    engine_options,
    print_json,
    print_table,
)
from unbackdoor.models.registry import model_names


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "dbd", help="DBD: train a clean model on possibly poisoned labelled data and flag the poisoned samples",
        description="Backdoor Defense via Decoupling the Training Process (Huang et al., ICLR 2022): "
        "SimCLR backbone without labels, a linear head on the frozen backbone (SCE), then MixMatch "
        "fine-tuning on the low-loss half as labelled data. Writes the model directory (model.safetensors + "
        "model.json) at OUT, checkpoints/, config.yaml, metrics.json, detection.csv/.json and history.json.")
    p.add_argument("--data", required=True, help="poisoned-data directory (from 'unbackdoor poison') or an .npz file")
    p.add_argument("--model", default="cnn-small", help=f"architecture: {', '.join(model_names())} (default cnn-small)")
    add_out_args(p)
    p.add_argument("--preset", default="paper", choices=["paper", "quick"],
                   help="paper: the paper's settings (CIFAR-10 scale); quick: mnist5k / cnn-small in minutes on a CPU")
    p.add_argument("--config", help="YAML file overriding the preset (keys of DBDConfig: simclr, linear, mixmatch, "
                   "seed, ...; or under a 'dbd:' section)")
    p.add_argument("--seed", type=int, help="random seed (model initialisation, batches, augmentation)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_engine_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from unbackdoor.attacks.poisoned_data import load_data
    from unbackdoor.core.config import load_config, override
    from unbackdoor.core.errors import EmptyDataset
    from unbackdoor.defenses.dbd.config import dbd_preset
    from unbackdoor.defenses.dbd.stages import run_dbd
    from unbackdoor.experiment.pipeline import build_model
    from unbackdoor.training.engine import set_seed

    cfg = load_config(dbd_preset(args.preset), args.config, section="dbd")
    if args.seed is not None:
        cfg = override(cfg, {"seed": args.seed})
    cfg = override(cfg, {"engine": vars(engine_options(args))})
    cfg.validate()
    pd = load_data(args.data)
    if len(pd.train) == 0:
        raise EmptyDataset(f"{args.data}: the training set holds 0 images")
    set_seed(cfg.seed)
    model = build_model(args.model, pd)
    res = run_dbd(model, pd, cfg, out_dir=args.out, resume=args.resume, force=args.force,
                  provenance={"data": str(args.data), "preset": args.preset})
    m = res.metrics
    if args.json:
        print_json(m)
        return 0
    rows = []
    for name, key in (("after stage 2 (head)", "after_stage2"), ("after stage 3 (final)", "after_stage3")):
        if key in m:
            rows.append({"model": name, **m[key]})
    if rows:
        print_table(rows, ["model"] + [k for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy") if k in rows[0]])
        print()
    det = m["detection"]
    print_table([{**det, "seconds": m["seconds"]["total"]}],
                [k for k in ("n_flagged", "precision", "recall", "f1", "auroc", "seconds") if k in det or k == "seconds"])
    print(f"wrote {args.out}")
    return 0
