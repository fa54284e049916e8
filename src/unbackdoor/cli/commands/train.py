"""unbackdoor train: train a (possibly backdoored) model on a poisoned-data folder."""
from __future__ import annotations

import argparse

from unbackdoor.cli.commands.common import add_engine_args, add_out_args, engine_options, print_json, print_table
from unbackdoor.core.config import load_config, override
from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.experiment.pipeline import train
from unbackdoor.models.registry import model_names
from unbackdoor.training.fit import TrainConfig


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model on a poisoned-data folder or .npz",
                       description="Train a classifier with cross-entropy. Writes a model directory "
                       "(model.safetensors + model.json), checkpoint.pt, history.json, config.yaml and metrics.json.")
    p.add_argument("--data", required=True, help="poisoned-data directory (from 'unbackdoor poison') or an .npz file")
    p.add_argument("--model", default="cnn-small", help=f"architecture: {', '.join(model_names())} (default cnn-small)")
    add_out_args(p)
    p.add_argument("--epochs", type=int, help="number of epochs (default from the config: 12)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML file overriding training settings (keys of TrainConfig, or a 'train:' section)")
    p.add_argument("--clean", action="store_true", help="train on the split as it was before poisoning (original images, true labels): a clean reference model")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_engine_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig(), args.config, section="train")
    cli = {k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}.items() if v is not None}
    cfg = override(cfg, cli)
    cfg = override(cfg, {"engine": vars(engine_options(args))})
    if cfg.epochs < 1:
        raise UnbackdoorError(f"--epochs must be >= 1, got {cfg.epochs}")
    m = train(args.data, args.out, args.model, cfg, resume=args.resume, force=args.force, clean=args.clean)
    if args.json:
        print_json(m)
    else:
        print_table([m], ["model", "epochs", "clean_accuracy", "attack_success_rate", "robust_accuracy", "train_seconds"])
    return 0
