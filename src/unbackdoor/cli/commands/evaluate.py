"""unbackdoor evaluate: clean accuracy, ASR and robust accuracy of a model."""
from __future__ import annotations

import argparse

from unbackdoor.cli.commands.common import print_json, print_table
from unbackdoor.experiment.pipeline import evaluate
from unbackdoor.training.device import pick_device


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="measure clean accuracy / ASR / robust accuracy",
                       description="Evaluate a model directory on a poisoned-data folder's clean test set and its triggered copy.")
    p.add_argument("--model", required=True, help="model directory (model.safetensors + model.json) or BackdoorBench attack_result.pt")
    p.add_argument("--data", required=True, help="poisoned-data directory or .npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    m = evaluate(args.model, args.data, device=pick_device(args.device))
    if args.json:
        print_json(m)
    else:
        print_table([m], [k for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy", "n_test", "n_triggered") if k in m])
    return 0
