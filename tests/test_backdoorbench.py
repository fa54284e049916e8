"""The safe BackdoorBench import (models/backdoorbench.py): weights mapped onto our models,
BackdoorBench's forward pass as the reference, and the input normalisation taken from the
file's dataset or from the caller (never guessed)."""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.safe_pickle import Placeholder
from unbackdoor.models.backdoorbench import NORMALIZATION, parse_normalization, read_attack_result
from unbackdoor.models.model_dir import load_model, save_model
from unbackdoor.models.registry import create


# ---------------------------------------------------------------------------- BackdoorBench-style files
def _backdoorbench_preact_forward(sd: dict, x: torch.Tensor, mean, std) -> torch.Tensor:
    """BackdoorBench's PreActResNet18.forward (models/preact_resnet.py) written against its
    own state_dict keys, plus its Normalize transform: the reference for the import."""

    def bn(prefix, v):
        return F.batch_norm(v, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                            sd[f"{prefix}.bias"], training=False)

    out = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    out = F.conv2d(out, sd["conv1.weight"], padding=1)
    for layer in range(1, 5):
        for blk in range(2):
            p = f"layer{layer}.{blk}"
            stride = 2 if (layer > 1 and blk == 0) else 1
            o = F.relu(bn(f"{p}.bn1", out))
            sc = F.conv2d(o, sd[f"{p}.shortcut.0.weight"], stride=stride) if f"{p}.shortcut.0.weight" in sd else out
            o = F.conv2d(o, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            o = F.conv2d(F.relu(bn(f"{p}.bn2", o)), sd[f"{p}.conv2.weight"], padding=1)
            out = o + sc
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def _preact_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A BackdoorBench PreActResNet18 state_dict (slim): no 'backbone.' prefix, 'linear' for the
    classifier, no normalisation buffers; BN statistics away from their defaults."""
    torch.manual_seed(seed)
    ours = create("preact-resnet18", num_classes=10, final_bn=False, width=16)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return {k.replace("backbone.", "").replace("fc.", "linear."): v.clone()
            for k, v in ours.state_dict().items() if not k.startswith("normalize.")}


@contextlib.contextmanager
def _importable_as(module: str, *classes: type):
    """Make ``classes`` picklable under ``module`` (BackdoorBench's own packages), for writing only."""
    names = module.split(".")
    mods = {".".join(names[: i + 1]): types.ModuleType(".".join(names[: i + 1])) for i in range(len(names))}
    for cls in classes:
        cls.__module__ = module
        setattr(mods[module], cls.__qualname__, cls)
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class prepro_cls_DatasetBD_v2:  # BackdoorBench's own class name
    """Stands for BackdoorBench's dataset state (utils/bd_dataset_v2.py)."""

    def __init__(self, images=None):
        self.poison_indicator = np.array([0, 1, 0, 1], dtype=np.int64)
        self.save_folder_path = None
        self.images = images


def _write_result(path, sd, *, clean_data=None, bd_train=None):
    """torch.save a BackdoorBench result dict (clean_data left out when None, as in defense_result.pt)."""
    obj = {"model_name": "preactresnet18", "num_classes": 10, "model": sd, "data_path": "./data/cifar10",
           "img_size": (32, 32, 3), "bd_test": {"poison_indicator": np.ones(3)}}
    if clean_data is not None:
        obj["clean_data"] = clean_data
    if bd_train is not None:
        obj["bd_train"] = bd_train
    with _importable_as("utils.bd_dataset_v2", prepro_cls_DatasetBD_v2):
        torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------- import
def test_backdoorbench_attack_result_is_imported_without_running_it(tmp_path):
    bb_sd = _preact_state_dict()
    path = _write_result(tmp_path / "attack_result.pt", bb_sd, clean_data="cifar10",
                         bd_train=prepro_cls_DatasetBD_v2())
    with pytest.raises(pickle.UnpicklingError):  # what a weights-only load says about it
        torch.load(path, weights_only=True)

    obj, report = read_attack_result(path)
    assert report.loader == "restricted"
    assert report.replaced == {"utils.bd_dataset_v2.prepro_cls_DatasetBD_v2": 1}
    assert isinstance(obj["bd_train"], Placeholder)
    assert np.array_equal(obj["bd_train"]._state["poison_indicator"], [0, 1, 0, 1])  # plain data is kept

    with pytest.warns(UserWarning, match="prepro_cls_DatasetBD_v2"):
        model = load_model(path)
    assert model.arch["name"] == "preact-resnet18" and model.import_report["replaced"]
    assert model.import_report["normalization"]["mean"] == NORMALIZATION["cifar10"][0]
    got = model.state_dict()
    for k, v in bb_sd.items():
        assert torch.equal(got["backbone." + k if not k.startswith("linear.") else k.replace("linear.", "fc.")], v)
    x = torch.rand(4, 3, 32, 32)
    mean, std = NORMALIZATION["cifar10"]
    assert torch.allclose(model(x), _backdoorbench_preact_forward(bb_sd, x, mean, std), atol=1e-4)
    # the imported model goes through save_model / load_model like ours
    save_model(model, tmp_path / "imported")
    assert torch.allclose(load_model(tmp_path / "imported")(x), model(x), atol=1e-5)


def test_the_warning_counts_objects_not_classes(tmp_path):
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(7)]
    path = _write_result(tmp_path / "attack_result.pt", _preact_state_dict(), clean_data="cifar10",
                         bd_train=prepro_cls_DatasetBD_v2(images))
    with pytest.warns(UserWarning) as caught:
        model = load_model(path)
    msg = " ".join(str(w.message) for w in caught)
    assert "8 object(s) of 2 untrusted class(es)" in msg, msg
    assert "PIL.Image.Image (x7)" in msg and "prepro_cls_DatasetBD_v2 (x1)" in msg
    assert model.import_report["replaced"] == {"PIL.Image.Image": 7, "utils.bd_dataset_v2.prepro_cls_DatasetBD_v2": 1}


def test_backdoorbench_torchvision_resnet18_plain_file(tmp_path):
    """A file with nothing but tensors and plain values loads through torch's weights-only path."""
    torch.manual_seed(1)
    ours = create("resnet18", num_classes=43, stem="imagenet", width=8)
    tv_sd = {k.replace("backbone.", "").replace(".shortcut.", ".downsample."): v.clone()
             for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
    assert "layer2.0.downsample.1.running_var" in tv_sd and "conv1.weight" in tv_sd
    torch.save({"model_name": "resnet18", "num_classes": 43, "model": tv_sd, "img_size": [32, 32, 3],
                "clean_data": "gtsrb", "bd_train": None, "bd_test": None}, tmp_path / "attack_result.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing replaced: nothing to warn about
        model = load_model(tmp_path / "attack_result.pt")
    assert model.import_report["loader"] == "weights_only" and not model.import_report["replaced"]
    ours.eval()
    ours.normalize.mean.zero_()  # BackdoorBench normalises GTSRB with mean 0, std 1
    ours.normalize.std.fill_(1.0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), ours(x), atol=1e-5)


# ---------------------------------------------------------------------------- normalisation
def test_a_file_without_its_dataset_needs_the_normalisation(tmp_path):
    bb_sd = _preact_state_dict()
    known = load_model(_write_result(tmp_path / "attack_result.pt", bb_sd, clean_data="cifar10"))
    # a defense_result.pt: the model, but no clean_data
    path = _write_result(tmp_path / "defense_result.pt", bb_sd, bd_train=prepro_cls_DatasetBD_v2())
    with pytest.raises(UnbackdoorError, match="does not say which dataset") as err:
        load_model(path)
    assert "cifar10" in str(err.value) and "--" not in str(err.value)  # names the choices, no CLI flags
    x = torch.rand(4, 3, 32, 32)
    want = known(x)
    mean, std = NORMALIZATION["cifar10"]
    spec = f"{','.join(map(str, mean))}/{','.join(map(str, std))}"
    for given in ("cifar10", "CIFAR10", spec):
        with pytest.warns(UserWarning, match="prepro_cls_DatasetBD_v2"):
            model = load_model(path, normalization=given)
        assert torch.allclose(model(x), want, atol=1e-5), given
        info = model.import_report["normalization"]
        assert info["mean"] == pytest.approx(mean) and info["std"] == pytest.approx(std) and "note" not in info
    assert torch.allclose(want, _backdoorbench_preact_forward(bb_sd, x, mean, std), atol=1e-4)


def test_a_given_normalisation_wins_and_a_disagreement_is_noted(tmp_path):
    bb_sd = _preact_state_dict()
    path = _write_result(tmp_path / "attack_result.pt", bb_sd, clean_data="cifar10")
    same = load_model(path, normalization="cifar10")
    assert "note" not in same.import_report["normalization"]
    other = load_model(path, normalization="0.5/0.25")  # one value for every channel
    info = other.import_report["normalization"]
    assert info["mean"] == [0.5] * 3 and info["std"] == [0.25] * 3 and "cifar10" in info["note"]
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(other(x), _backdoorbench_preact_forward(bb_sd, x, [0.5] * 3, [0.25] * 3), atol=1e-4)
    assert not torch.allclose(other(x), same(x), atol=1e-3)


def test_normalisation_specs_are_checked():
    assert parse_normalization("mnist", 1) == ([0.5], [0.5])
    assert parse_normalization("mnist", 3) == ([0.5] * 3, [0.5] * 3)
    assert parse_normalization(" 0.1,0.2,0.3 / 1,2,3 ", 3) == ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    for bad, match in (("svhn", "unknown normalisation"), ("0.1,0.2/0.3", "2 mean"), ("a/b", "numbers"),
                       ("0.5/0", "positive"), ("0.5/nan", "finite")):
        with pytest.raises(UnbackdoorError, match=match):
            parse_normalization(bad, 3)
    with pytest.raises(UnbackdoorError, match="3 value"):
        parse_normalization("cifar10", 1)


def test_a_model_directory_refuses_a_contradicting_normalisation(tmp_path):
    model = create("resnet18", num_classes=10, width=8, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    save_model(model, tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    agreed = load_model(tmp_path / "m", normalization="0.1,0.2,0.3/0.5,0.5,0.5")
    assert torch.allclose(agreed(x), load_model(tmp_path / "m")(x))
    with pytest.raises(UnbackdoorError, match="stores its own input normalisation"):
        load_model(tmp_path / "m", normalization="cifar10")
