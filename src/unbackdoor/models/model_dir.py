"""Model directories: ``model.safetensors`` (weights) + ``model.json`` (architecture,
classes, input shape, normalisation, provenance).

Loading never executes code from the file: weights are read with safetensors;
the architecture is rebuilt from our registry by name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import atomic_path, read_json, write_json
from unbackdoor.models.backdoorbench import load_backdoorbench, parse_normalization
from unbackdoor.models.registry import create, model_names

FORMAT_VERSION = 1


def save_model(model: nn.Module, path: str | os.PathLike, *, classes: list[str] | None = None, provenance: dict | None = None) -> Path:
    """Write ``model`` to the folder ``path`` (created). Only models from our registry
    (which carry ``model.arch``) can be re-created by :func:`load_model`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    arch = getattr(model, "arch", None)
    if arch is None:
        raise UnbackdoorError(
            "only models created with unbackdoor.models.create can be saved as a model directory; "
            "save your own model's state_dict with safetensors instead"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {
        "format": "unbackdoor-model",
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "classes": classes or [str(i) for i in range(arch["num_classes"])],
        "input": {"channels": arch["in_channels"], "size": arch["image_size"], "range": [0.0, 1.0], "layout": "NCHW"},
        "normalization": {
            "mean": model.normalize.mean.flatten().tolist() if hasattr(model, "normalize") else None,
            "std": model.normalize.std.flatten().tolist() if hasattr(model, "normalize") else None,
        },
        "provenance": provenance or {},
    }
    write_json(path / "model.json", meta)
    return path


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UnbackdoorError(f"model path not found: {path}")
    if path.is_file():
        raise UnbackdoorError(f"{path} is a file; a model is a directory with model.safetensors + model.json")
    meta = read_json(path / "model.json")
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(arch, dict) or "name" not in arch:
        raise UnbackdoorError(f"{path / 'model.json'} has no valid 'architecture' entry")
    if arch["name"] not in model_names():
        raise UnbackdoorError(f"{path}: unknown architecture {arch['name']!r}; known: {', '.join(model_names())}")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               normalization: str | None = None) -> nn.Module:
    """Load a model directory; returns an eval-mode ``nn.Module`` taking [0,1] float NCHW images.

    Also accepts a BackdoorBench ``attack_result.pt`` / ``defense_result.pt``
    file (weights taken out without executing the pickle; see
    :mod:`unbackdoor.models.backdoorbench`). ``normalization`` (a dataset name
    or ``"m1,m2,m3/s1,s2,s3"``) is the input normalisation of such a file's
    model, needed when the file does not name its dataset. A model directory
    stores its own normalisation: a ``normalization`` that agrees with it is
    accepted, one that contradicts it is an error (a silent override would
    change what the saved model computes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        return load_backdoorbench(p, normalization=normalization).to(device).eval()
    meta = read_model_meta(p)
    arch = dict(meta["architecture"])
    name = arch.pop("name")
    try:
        model = create(name, **arch)
    except TypeError as e:  # e.g. a keyword the architecture does not take
        raise UnbackdoorError(f"{p / 'model.json'}: cannot build architecture {name!r} from {arch}: {e}") from None
    wfile = p / "model.safetensors"
    if not wfile.is_file():
        raise UnbackdoorError(f"model weights not found: {wfile}")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UnbackdoorError(f"corrupted model file {wfile}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UnbackdoorError(f"{wfile} does not match architecture {name!r} in model.json: {first}") from None
    model.classes = meta.get("classes")
    if normalization is not None:
        _check_normalization(model, normalization, p)
    return model.to(device).eval()


def _check_normalization(model: nn.Module, spec: str, path: Path) -> None:
    """Refuse a normalisation that contradicts the one a model directory stores."""
    norm = getattr(model, "normalize", None)
    if norm is None:
        raise UnbackdoorError(f"{path}: this model has no input normalisation of its own, so none can be checked "
                              f"against {spec!r}; load it without a normalisation")
    stored_mean, stored_std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    mean, std = parse_normalization(spec, len(stored_mean))
    close = torch.allclose(torch.tensor(mean), torch.tensor(stored_mean), rtol=1e-4, atol=1e-6) and torch.allclose(
        torch.tensor(std), torch.tensor(stored_std), rtol=1e-4, atol=1e-6)
    if not close:
        raise UnbackdoorError(
            f"{path} stores its own input normalisation (mean {[round(v, 4) for v in stored_mean]}, std "
            f"{[round(v, 4) for v in stored_std]}), which differs from the one given ({spec!r}); a model directory "
            "needs no normalisation, leave it out")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier layer: the last ``nn.Linear`` in registration order."""
    found = [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UnbackdoorError("model has no nn.Linear classifier layer")
    return found[-1]


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features entering the classifier, for our models and for any nn.Module
    (torchvision, timm, your own) by hooking the input of its last Linear layer."""
    m = unwrap(model)
    if hasattr(m, "features") and callable(m.features) and hasattr(m, "fc"):
        return m.features(x)
    _, lin = last_linear(m)
    store: list[torch.Tensor] = []
    h = lin.register_forward_hook(lambda mod, inp, out: store.append(inp[0]))
    try:
        m(x)
    finally:
        h.remove()
    return store[0]
