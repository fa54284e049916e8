"""``unbackdoor <defense>``: one subcommand per registered defense, its flags
derived from what the defense needs (``Defense.needs``) plus its own."""
from __future__ import annotations

import argparse

from unbackdoor.attacks.poisoned_data import load_data
from unbackdoor.cli.commands.common import add_engine_args, add_out_args, engine_options, print_json, print_table
from unbackdoor.core.config import override
from unbackdoor.core.errors import EmptyDataset, UnbackdoorError
from unbackdoor.core.layout import METRIC_KEYS
from unbackdoor.data.unlabeled import load_unlabeled
from unbackdoor.defenses.base import Defense, DefenseInputs
from unbackdoor.models.model_dir import load_model
from unbackdoor.models.registry import model_names


def add_defense_parser(sub, defense: Defense) -> argparse.ArgumentParser:
    needs = set(defense.needs)
    p = sub.add_parser(defense.name, help=defense.summary, description=defense.description
                       + (" Uses labelled clean images (--clean)." if defense.uses_labels else ""))
    if "train_set" in needs:
        p.add_argument("--data", required=True, help="poisoned-data directory (from 'unbackdoor poison') or an .npz file")
    if "model" in needs:
        p.add_argument("--model", required=True,
                       help="model directory (model.safetensors + model.json) or BackdoorBench attack_result.pt "
                       "(read without executing code)")
        p.add_argument("--normalization", metavar="DATASET|MEAN/STD",
                       help="BackdoorBench files without their dataset: the dataset the model was trained on "
                       "(cifar10, gtsrb, ...) or its input normalisation as 'm1,m2,m3/s1,s2,s3'")
    else:
        p.add_argument("--model", default="cnn-small",
                       help=f"architecture: {', '.join(model_names())} (default cnn-small)")
    if "unlabeled" in needs:
        p.add_argument("--unlabeled", required=True, metavar="SRC",
                       help="unlabeled images: a poisoned-data directory (its clean heldout split; labels ignored), "
                       "an .npz, an image folder, or a dataset name (its training split, e.g. 'digits' as "
                       "out-of-distribution data); converted to the model's channels and size")
        p.add_argument("--fit", choices=("resize", "pad"), default="resize",
                       help="how unlabeled images of another size are fitted: resize (stretch) or pad (resize to 5/7 "
                       "of the side and zero-pad, MNIST framing) (default: resize)")
        p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="allow horizontal flips of the unlabeled images (default: the dataset's own setting; "
                       "off for files and folders)")
    if "clean_labelled" in needs:
        p.add_argument("--clean", metavar="SRC",
                       help="labelled clean images: a poisoned-data directory (its heldout split) or an .npz "
                       "(default: the heldout split of --data)")
    if "train_set" not in needs:
        p.add_argument("--data", help="poisoned-data directory: report clean accuracy / ASR / robust accuracy before "
                       "and after, and DER")
    add_out_args(p)
    p.add_argument("--preset", default="paper", choices=list(defense.presets),
                   help="paper: the paper's settings; quick: mnist5k / cnn-small in minutes on a CPU (default: paper)")
    p.add_argument("--config", help=f"YAML file overriding the preset ({defense.config_type.__name__} keys, or under a "
                   f"'{defense.name}:' section)")
    p.add_argument("--seed", type=int, help="random seed (model initialisation, batches, augmentation)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    defense.add_arguments(p)
    add_engine_args(p)
    p.set_defaults(_run=lambda args: run_defense(defense, args))
    return p


def _labelled_pool(src: str) -> object:
    pd = load_data(src)
    return pd.heldout if pd.heldout is not None and pd.train is not pd.test else pd.train


def defense_inputs(defense: Defense, args: argparse.Namespace, seed: int) -> DefenseInputs:
    """The inputs ``defense`` needs, read from the command line's paths."""
    needs = set(defense.needs)
    pd = load_data(args.data) if getattr(args, "data", None) else None
    inputs = DefenseInputs(test=pd.test if pd else None, attack=pd.attack if pd else None)
    if "train_set" in needs:
        if len(pd.train) == 0:
            raise EmptyDataset(f"{args.data}: the training set holds 0 images")
        inputs.train, inputs.arch = pd.train, args.model
        inputs.provenance = {"data": str(args.data), "preset": args.preset}
    if "model" in needs:
        model = load_model(args.model, normalization=args.normalization)
        arch = getattr(model, "arch", None)
        if arch is None:  # pragma: no cover - load_model always returns registry models
            raise UnbackdoorError(f"{args.model}: cannot tell the model's input shape")
        if pd is not None and pd.test.num_classes != arch["num_classes"]:
            raise UnbackdoorError(f"model has {arch['num_classes']} classes, {args.data} has {pd.test.num_classes}")
        inputs.model = model
        inputs.provenance["teacher"] = str(args.model)
    shape = inputs.train.shape if inputs.train is not None else (
        (inputs.model.arch["in_channels"], inputs.model.arch["image_size"], inputs.model.arch["image_size"]))
    if "unlabeled" in needs:
        inputs.unlabeled = load_unlabeled(args.unlabeled, shape, fit=args.fit, seed=seed, flip=args.flip)
        inputs.provenance["unlabeled"] = str(args.unlabeled)
    if "clean_labelled" in needs:
        src = args.clean or args.data
        if src is None:
            raise UnbackdoorError(f"{defense.label} needs labelled clean images: name a data folder or .npz")
        inputs.clean = _labelled_pool(src)
        inputs.provenance["clean"] = str(src)
    if "model" in needs and getattr(inputs.model, "import_report", None):
        inputs.provenance["teacher_import"] = inputs.model.import_report
    return inputs


def run_defense(defense: Defense, args: argparse.Namespace) -> int:
    cfg = defense.load_config(args.preset, args.config)
    if args.seed is not None:
        cfg = override(cfg, {"seed": args.seed}, where=defense.name)
    cfg = defense.configure(cfg, args)
    cfg = override(cfg, {"engine": vars(engine_options(args))}, where=defense.name)
    cfg.validate()
    inputs = defense_inputs(defense, args, cfg.seed)
    res = defense.run(inputs, cfg, args.out, resume=args.resume, force=args.force)
    m = res.metrics
    if args.json:
        print_json(m)
        return 0
    print_summary(m)
    print(f"wrote {args.out}")
    return 0


def print_summary(m: dict) -> None:
    """Before / per-stage / final numbers, DER, detection and time of a run's metrics."""
    rows = []
    if m.get("before"):
        rows.append({"model": "before (suspicious)", **m["before"]})
    stages = m.get("stages") or {}
    for name, block in stages.items():
        if block is not m.get("final") and block != m.get("final"):
            rows.append({"model": name.replace("_", " "), **block})
    if m.get("final"):
        rows.append({"model": f"final ({m['label']})", **m["final"]})
    if rows:
        print_table(rows, ["model", *[k for k in METRIC_KEYS if k in rows[-1]]])
        print()
    if isinstance(m.get("der"), (int, float)):
        print(f"DER {m['der']:.3f}")
    det = m.get("detection")
    if isinstance(det, dict):
        print_table([det], [k for k in ("n_flagged", "precision", "recall", "f1", "auroc") if k in det])
    secs = (m.get("seconds") or {}).get("total")
    bits = [f"{secs:.1f}s" if isinstance(secs, (int, float)) else None, m.get("precision")]
    print(f"{m['label']}: " + ", ".join(str(b) for b in bits if b))
