"""unbackdoor poison: poison a dataset with a standard attack."""
from __future__ import annotations

import argparse

from unbackdoor.attacks.base import MODES, attack_names
from unbackdoor.cli.commands.common import parse_params, print_table
from unbackdoor.data.loaders import dataset_names
from unbackdoor.experiment.pipeline import poison


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("poison", help="poison a dataset with an attack and write train/test/held-out splits",
                       description="Poison a dataset's training split with a backdoor attack. Writes train.npz "
                       "(with the poison mask), the clean test.npz and heldout.npz, attack.json, config.yaml, metrics.json.")
    p.add_argument("--dataset", required=True, help=f"{', '.join(dataset_names())}, or a path to an .npz / image folder")
    p.add_argument("--root", help="local files for cifar10, cifar100, gtsrb, imagefolder")
    p.add_argument("--attack", required=True, help=", ".join(attack_names()))
    p.add_argument("--rate", type=float, default=0.1, help="fraction of the training set to poison, in (0, 1] (default 0.1)")
    p.add_argument("--target", type=int, default=0, help="target label (all-to-one) (default 0)")
    p.add_argument("--mode", default="all-to-one", choices=MODES)
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="attack parameter, repeatable (e.g. patch_size=4, alpha=0.1, trigger=img.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    return p


def run(args: argparse.Namespace) -> int:
    pd = poison(args.dataset, args.attack, args.out, rate=args.rate, target=args.target, seed=args.seed,
                mode=args.mode, root=args.root, params=parse_params(args.param), force=args.force)
    m = pd.meta
    print_table([m], ["dataset", "attack", "rate", "target", "n_train", "n_poisoned", "n_test", "n_heldout"])
    print(f"wrote {args.out}")
    return 0
