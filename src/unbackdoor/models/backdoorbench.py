"""BackdoorBench's ``attack_result.pt`` / ``defense_result.pt`` -> our classifier.

BackdoorBench (``utils/save_load_attack.py``) writes ``torch.save({...})`` with
``model_name, num_classes, model`` (a state_dict), ``data_path, img_size,
clean_data, bd_train, bd_test``; a defense's result holds the model but often no
``clean_data``. The ``bd_*`` entries are dataset states built from
BackdoorBench's own classes (and PIL images), so a weights-only ``torch.load``
refuses the file, and a plain ``torch.load`` would run whatever the pickle
names. The file is therefore read by :func:`unbackdoor.core.safe_pickle.load_torch`
with inert stand-ins for those classes; only the weights are used.

The weights are mapped onto our ``preact-resnet18`` / ``resnet18`` (key names
differ: ``linear`` -> ``fc``, ``downsample`` -> ``shortcut``, ...), with
BackdoorBench's per-dataset input normalisation moved inside the model. The
normalisation comes from the dataset the file names, or from the caller: a
file that names none is refused rather than guessed at, since a wrong
normalisation gives a model that still runs but answers wrongly.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.safe_pickle import UnpickleReport, load_torch
from unbackdoor.models.registry import create

# BackdoorBench model name -> (our registry name, extra create() kwargs).
# Their PreActResNet18 has no BN+ReLU after layer4; their resnet18 is torchvision's
# (7x7/2 stem + max-pool): both are variants of our models, selected by kwargs.
MODEL_MAP: dict[str, tuple[str, dict]] = {
    "preactresnet18": ("preact-resnet18", {"final_bn": False}),
    "resnet18": ("resnet18", {"stem": "imagenet"}),
}

# BackdoorBench's get_dataset_normalization (utils/aggregate_block/dataset_and_transform_generate.py).
NORMALIZATION: dict[str, tuple[list[float], list[float]]] = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "mnist": ([0.5], [0.5]),
    "tiny": ([0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262]),
    "gtsrb": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    "celeba": ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}

_SPEC_FORM = "'m1,m2,m3/s1,s2,s3' (per-channel mean / std; one value each for grey images)"


def parse_normalization(spec: str, channels: int) -> tuple[list[float], list[float]]:
    """Mean and std (``channels`` values each) from a dataset name BackdoorBench uses
    (see :data:`NORMALIZATION`) or from ``"m1,m2,m3/s1,s2,s3"``; one value is
    repeated over the channels. Raises :class:`UnbackdoorError` for anything else."""
    text = str(spec).strip()
    if text.lower() in NORMALIZATION:
        mean, std = NORMALIZATION[text.lower()]
    elif "/" in text:
        m_text, _, s_text = text.partition("/")
        try:
            mean = [float(v) for v in m_text.split(",")]
            std = [float(v) for v in s_text.split(",")]
        except ValueError:
            raise UnbackdoorError(f"normalisation {text!r}: mean and std must be numbers, as {_SPEC_FORM}") from None
        if len(mean) != len(std):
            raise UnbackdoorError(f"normalisation {text!r}: {len(mean)} mean value(s) but {len(std)} std value(s)")
        if not all(math.isfinite(v) for v in mean + std) or any(v <= 0 for v in std):
            raise UnbackdoorError(f"normalisation {text!r}: values must be finite and std positive")
    else:
        raise UnbackdoorError(f"unknown normalisation {text!r}: give a dataset name "
                              f"({', '.join(sorted(NORMALIZATION))}) or {_SPEC_FORM}")
    if len(mean) == 1 and channels != 1:  # e.g. mnist's single value for a 3-channel model
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise UnbackdoorError(f"normalisation {text!r} has {len(mean)} value(s) but the model takes {channels} "
                              "channel(s)")
    return list(mean), list(std)


def read_attack_result(path: str | os.PathLike) -> tuple[dict, UnpickleReport]:
    """Read a BackdoorBench result file (or any torch checkpoint dict) safely.

    Returns the top-level dict (untrusted objects replaced by
    :class:`~unbackdoor.core.safe_pickle.Placeholder` stand-ins) and the
    :class:`~unbackdoor.core.safe_pickle.UnpickleReport`. Raises
    :class:`UnbackdoorError` for a file that names code-running globals, a
    corrupted file, or a non-dict payload.
    """
    path = Path(path)
    if not path.is_file():
        raise UnbackdoorError(f"model file not found: {path}")
    obj, report = load_torch(path, stand_ins=True)
    if not isinstance(obj, dict):
        raise UnbackdoorError(f"{path} holds a {type(obj).__name__}, expected BackdoorBench's result dict")
    return obj, report


def _map_key(bb_name: str, key: str) -> str:
    """BackdoorBench state_dict key -> our Classifier's key."""
    if bb_name == "preactresnet18":
        if key.startswith("linear."):
            return "fc." + key[len("linear."):]
        return "backbone." + key
    if bb_name == "resnet18":  # torchvision
        if key.startswith("fc."):
            return key
        return "backbone." + key.replace(".downsample.", ".shortcut.")
    raise KeyError(bb_name)


def convert_state_dict(bb_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a BackdoorBench state_dict to our key names (weights unchanged)."""
    return {_map_key(bb_name, k): v for k, v in state.items()}


def _normalization(path: Path, obj: dict, channels: int, given: str | None) -> tuple[list[float], list[float], dict]:
    """Mean, std and the import report's account of where they came from."""
    named = obj.get("clean_data")
    named = str(named).strip() if named is not None else ""
    from_file = None
    if named:
        if named.lower() not in NORMALIZATION and given is None:
            raise UnbackdoorError(f"{path} names dataset {named!r}, whose input normalisation is not known here; "
                                  f"give the normalisation as {_SPEC_FORM}")
        if named.lower() in NORMALIZATION:
            try:
                from_file = parse_normalization(named, channels)
            except UnbackdoorError as e:
                raise UnbackdoorError(f"{path}: the file's dataset does not fit its model: {e}") from None
    if given is None:
        if from_file is None:
            raise UnbackdoorError(
                f"{path} does not say which dataset the model was trained on (no 'clean_data' entry), so its "
                f"input normalisation is unknown; name the dataset ({', '.join(sorted(NORMALIZATION))}) or give "
                f"the normalisation as {_SPEC_FORM}")
        mean, std = from_file
        info = {"mean": mean, "std": std, "from": f"the file's dataset {named!r}"}
        return mean, std, info
    mean, std = parse_normalization(given, channels)
    info = {"mean": mean, "std": std, "from": f"given: {given!r}"}
    if from_file is not None and not (np.allclose(mean, from_file[0]) and np.allclose(std, from_file[1])):
        # The caller's choice wins (the file's clean_data may be wrong); the report keeps both.
        info["note"] = (f"differs from the normalisation of the file's dataset {named!r} "
                        f"(mean {from_file[0]}, std {from_file[1]})")
    return mean, std, info


def load_backdoorbench(path: str | os.PathLike, normalization: str | None = None) -> nn.Module:
    """Load the model of a BackdoorBench result file as our eval-mode classifier.

    The returned module takes float images in [0, 1] (N, C, H, W) like every
    model here: the input normalisation is moved inside it. ``normalization``
    is a dataset name or ``"m1,m2,m3/s1,s2,s3"`` (see :func:`parse_normalization`);
    it is needed when the file does not name its dataset, and when given it
    wins over the file's (the import report notes any difference). What was
    replaced by stand-ins is in ``model.import_report`` and announced with a
    warning. Never executes code from the file.
    """
    path = Path(path)
    obj, report = read_attack_result(path)
    missing = [k for k in ("model_name", "model") if k not in obj]
    if missing:
        raise UnbackdoorError(f"{path} is not a BackdoorBench result: missing {missing} "
                              f"(has {sorted(map(str, obj))[:10]})")
    bb_name = str(obj["model_name"])
    if bb_name not in MODEL_MAP:
        raise UnbackdoorError(f"{path}: BackdoorBench model {bb_name!r} is not supported; "
                              f"supported: {', '.join(sorted(MODEL_MAP))}")
    state = obj["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnbackdoorError(f"{path}: 'model' is not a state_dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    ours, kw = MODEL_MAP[bb_name]
    stem_w = state.get("conv1.weight")
    fc_w = state.get("linear.weight" if bb_name == "preactresnet18" else "fc.weight")
    if stem_w is None or fc_w is None:
        raise UnbackdoorError(f"{path}: state_dict of {bb_name!r} lacks conv1/classifier weights")
    in_channels, num_classes, width = int(stem_w.shape[1]), int(fc_w.shape[0]), int(stem_w.shape[0])
    if width != 64:  # a slimmer variant: same layout, other width
        kw = {**kw, "width": width}
    if "num_classes" in obj and int(obj["num_classes"]) != num_classes:
        raise UnbackdoorError(f"{path}: num_classes={obj['num_classes']} but the classifier has {num_classes} outputs")
    img_size = obj.get("img_size")
    try:
        size = int(img_size[0]) if img_size is not None else 32
    except (TypeError, ValueError, IndexError):
        raise UnbackdoorError(f"{path}: unreadable img_size {img_size!r}") from None
    mean, std, norm_info = _normalization(path, obj, in_channels, normalization)
    model = create(ours, num_classes=num_classes, in_channels=in_channels, image_size=size, mean=mean, std=std, **kw)
    ours_state = convert_state_dict(bb_name, state)
    expected = model.state_dict()
    for k in ("normalize.mean", "normalize.std"):
        ours_state[k] = expected[k]
    try:
        model.load_state_dict(ours_state, strict=True)
    except RuntimeError as e:
        raise UnbackdoorError(f"{path}: weights do not fit {ours}: {str(e).splitlines()[0]}") from None
    model.classes = [str(i) for i in range(num_classes)]
    dataset = obj.get("clean_data")
    model.import_report = {
        "source": str(path), "format": "backdoorbench", "model_name": bb_name,
        "dataset": str(dataset) if dataset is not None else None, "normalization": norm_info,
        "loader": report.loader, "replaced": dict(report.replaced),
        "ignored_entries": sorted(str(k) for k in obj if k != "model"),
    }
    if report.replaced:
        warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
    return model.eval()
