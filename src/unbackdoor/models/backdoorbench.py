"""Import BackdoorBench's ``attack_result.pt`` without executing it.

BackdoorBench (``utils/save_load_attack.py``) writes ``torch.save({...})`` with
``model_name, num_classes, model`` (a state_dict), ``data_path, img_size,
clean_data, bd_train, bd_test``. The ``bd_*`` entries are dataset states built
from BackdoorBench's own classes (and PIL images), so a weights-only
``torch.load`` refuses the file, and a plain ``torch.load`` would import and
run whatever the pickle names: a model from a stranger must never do that.

Loading therefore goes:

1. ``torch.load(weights_only=True)``: if the file holds only tensors and plain
   containers, done.
2. Otherwise :class:`RestrictedUnpickler` reads torch's zip archive itself
   (``<root>/data.pkl`` + ``<root>/data/<key>`` raw storages). It never imports
   a module and never calls anything outside a short allow-list:

   - tensors and storages are rebuilt by our own code from the raw bytes
     (dtype from the storage type, bounds checked);
   - ``OrderedDict``, ``set``, numpy arrays/dtypes/scalars are rebuilt;
   - a global from a module that can run code (``os``, ``subprocess``,
     ``builtins.eval``, any non-allow-listed ``torch``/``numpy`` function, ...)
     makes the whole file refused: no honest checkpoint needs one;
   - any other global (``utils.bd_dataset_v2.prepro_cls_DatasetBD_v2``,
     ``PIL.Image.Image``, ...) becomes an inert :class:`Placeholder` that only
     records its constructor arguments and state; the names are reported.

The weights are then mapped onto our ``preact-resnet18`` / ``resnet18``
(key names differ: ``linear`` -> ``fc``, ``downsample`` -> ``shortcut``, ...),
with BackdoorBench's per-dataset input normalisation moved inside the model.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unbackdoor.core.errors import UnbackdoorError
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

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_TORCH_DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                                   "uint8", "bool", "complex64", "complex128")
}

# Stdlib modules whose classes are harmless data (they become placeholders, like any
# third-party class); every other stdlib module, and torch/numpy beyond the allow-list,
# can reach code execution or I/O, so a file naming one is refused outright.
_INERT_STDLIB = {"collections", "datetime", "argparse", "pathlib", "enum", "decimal", "fractions", "uuid",
                 "typing", "dataclasses", "numbers", "ipaddress"}
_POWERFUL_THIRD_PARTY = {"torch", "numpy", "dill", "cloudpickle", "joblib", "yaml", "pip", "setuptools",
                         "_pickle", "pkg_resources", "IPython"}


# ---------------------------------------------------------------------------- placeholders
class Placeholder:
    """An inert stand-in for a class or function the file names but we do not trust.

    Subclasses are made per name (see :func:`_placeholder_class`); calling one,
    ``__new__``-ing it, or giving it state only stores what the pickle passed.
    """

    _module: str = "?"
    _name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - nothing to run
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    # list / dict subclasses are filled by APPENDS / SETITEMS opcodes
    def append(self, item: Any) -> None:
        self._items.append(item)

    def extend(self, items: Any) -> None:
        self._items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items.append((key, value))

    def __repr__(self) -> str:
        return f"<skipped {self._module}.{self._name}>"


def _placeholder_class(module: str, name: str) -> type:
    return type(f"Skipped[{module}.{name}]", (Placeholder,), {"_module": module, "_name": name})


# ---------------------------------------------------------------------------- safe rebuilders
@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass
class _Storage:
    """Raw bytes of one storage, viewed as a flat tensor of its dtype."""

    flat: torch.Tensor


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    try:
        offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("malformed tensor size/stride") from None
    n = storage.flat.numel()
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"malformed tensor geometry size={size} stride={stride}")
    last = offset + sum((sz - 1) * st for sz, st in zip(size, stride)) if all(size) else offset - 1
    if last >= n:
        raise pickle.UnpicklingError(f"tensor of size {size} reaches past its storage ({n} elements)")
    return torch.as_strided(storage.flat, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, *rest: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from a non-tensor")
    return data  # weights only: a plain tensor is all load_state_dict needs


_TENSOR_TYPE = object()  # stands for torch.Tensor: the class itself is never handed to the pickle


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("tensor subclass rebuilt with a non-allow-listed function")
    return func(*args)


def _empty_ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy array rebuilt with a non-ndarray type")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_dtype(*args: Any) -> np.dtype:
    if not args or not isinstance(args[0], str):
        raise pickle.UnpicklingError("numpy dtype rebuilt from a non-string")
    return np.dtype(*args)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar rebuilt without a dtype")
    if dtype.hasobject:
        return data
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode(encoding, errors)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # Protocol-2 pickles of plain classes: copyreg._reconstructor(cls, object, None).
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls()
    if cls is collections.OrderedDict:
        return collections.OrderedDict()
    raise pickle.UnpicklingError(f"copyreg._reconstructor of a non-placeholder {cls!r}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _codecs_encode,
        ("copyreg", "_reconstructor"): _copyreg_reconstructor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        ("torch", "Size"): tuple,
        ("torch", "Tensor"): _TENSOR_TYPE,  # only ever an argument of _rebuild_from_type_v2
        ("torch", "device"): str,  # a device name is all we keep
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _np_reconstruct
        allowed[(mod, "scalar")] = _np_scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = _np_dtype
    for name, dt in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dt)
    for name, dt in _TORCH_DTYPES.items():
        allowed[("torch", name)] = dt
    return allowed


@dataclass
class LoadReport:
    """What :func:`read_attack_result` did: which loader worked and what it left out."""

    loader: str = ""  # "weights_only" or "restricted"
    skipped: dict[str, int] = field(default_factory=dict)  # "module.name" -> times seen

    def summary(self) -> str:
        if not self.skipped:
            return f"loaded with {self.loader} unpickler; nothing skipped"
        names = ", ".join(f"{k} (x{v})" for k, v in sorted(self.skipped.items()))
        return (f"loaded with the restricted unpickler; {sum(self.skipped.values())} object(s) of "
                f"{len(self.skipped)} untrusted class(es) were NOT rebuilt (inert placeholders): {names}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive without importing or running anything
    outside the allow-list (see the module docstring for the rules)."""

    def __init__(self, file: io.BufferedIOBase, archive: zipfile.ZipFile, root: str, report: LoadReport):
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._root = root
        self._report = report
        self._allowed = _allowed_globals()
        self._storages: dict[str, _Storage] = {}
        self._placeholders: dict[tuple[str, str], type] = {}
        self._byteorder = "little"
        name = f"{root}/byteorder"
        if name in archive.namelist():
            self._byteorder = archive.read(name).decode().strip() or "little"

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, which names Python 2 modules (__builtin__.set, ...)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        top = module.split(".")[0]
        stdlib = getattr(sys, "stdlib_module_names", frozenset())
        if top in _POWERFUL_THIRD_PARTY or (top in stdlib and top not in _INERT_STDLIB) or top == "builtins":
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: the file asks to call code that no checkpoint needs "
                "(it may be malicious)"
            )
        label = f"{module}.{name}"
        self._report.skipped[label] = self._report.skipped.get(label, 0) + 1
        if key not in self._placeholders:
            self._placeholders[key] = _placeholder_class(module, name)
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        if isinstance(stype, _StorageType):
            dtype = stype.dtype
        elif isinstance(stype, torch.dtype):
            dtype = stype
        else:
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r:.80}")
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        if not re.fullmatch(r"[0-9A-Za-z_]+", key):
            raise pickle.UnpicklingError(f"malformed storage key {key!r:.40}")
        member = f"{self._root}/data/{key}"
        try:
            raw = self._archive.read(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {member} missing from the archive") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) % itemsize or (isinstance(numel, int) and len(raw) // itemsize < numel):
            raise pickle.UnpicklingError(f"storage {member} has {len(raw)} bytes, not a whole {dtype} array")
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if self._byteorder == "big" and itemsize > 1:
            flat = torch.from_numpy(flat.numpy().byteswap())
        st = _Storage(flat)
        self._storages[key] = st
        return st


def _restricted_load(path: Path, report: LoadReport) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnbackdoorError(
            f"{path} is not a torch zip archive (legacy torch.save format or not a checkpoint); "
            "re-save it with a recent torch, or export its state_dict with safetensors"
        ) from None
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise UnbackdoorError(f"{path}: expected one <root>/data.pkl in the archive, found {len(pkls)}")
        root = pkls[0].split("/")[0]
        data = archive.read(pkls[0])
        report.loader = "restricted"
        try:
            return RestrictedUnpickler(io.BytesIO(data), archive, root, report).load()
        except pickle.UnpicklingError as e:
            raise UnbackdoorError(f"refusing to load {path}: {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
            raise UnbackdoorError(f"corrupted checkpoint {path}: {type(e).__name__}: {e}") from None


def read_attack_result(path: str | os.PathLike) -> tuple[dict, LoadReport]:
    """Read a BackdoorBench ``attack_result.pt`` (or any torch checkpoint dict) safely.

    Returns the top-level dict (untrusted objects replaced by :class:`Placeholder`)
    and a :class:`LoadReport`. Raises :class:`UnbackdoorError` for a file that
    names code-running globals, a corrupted file, or a non-dict payload.
    """
    path = Path(path)
    if not path.is_file():
        raise UnbackdoorError(f"model file not found: {path}")
    report = LoadReport()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        report.loader = "weights_only"
    except pickle.UnpicklingError:
        obj = _restricted_load(path, report)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        # torch reports some refusals as RuntimeError; the restricted reader decides.
        if zipfile.is_zipfile(path):
            obj = _restricted_load(path, report)
        else:
            raise UnbackdoorError(f"corrupted or unsupported checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise UnbackdoorError(f"{path} holds a {type(obj).__name__}, expected BackdoorBench's attack_result dict")
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


def load_backdoorbench(path: str | os.PathLike) -> nn.Module:
    """Load the model of a BackdoorBench ``attack_result.pt`` as our eval-mode classifier.

    The returned module takes float images in [0, 1] (N, C, H, W) like every
    model here: BackdoorBench's per-dataset normalisation is moved inside it.
    What the restricted unpickler skipped is in ``model.import_report`` and
    announced with a warning. Never executes code from the file.
    """
    path = Path(path)
    obj, report = read_attack_result(path)
    missing = [k for k in ("model_name", "model") if k not in obj]
    if missing:
        raise UnbackdoorError(f"{path} is not a BackdoorBench attack result: missing {missing} "
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
    dataset = str(obj.get("clean_data", ""))
    if dataset in NORMALIZATION:
        mean, std = NORMALIZATION[dataset]
        if len(mean) != in_channels:  # e.g. mnist (1 value) fed to a 3-channel model
            mean, std = [mean[0]] * in_channels, [std[0]] * in_channels
    else:
        warnings.warn(f"{path}: unknown dataset {dataset!r}; assuming inputs normalised with mean 0, std 1",
                      stacklevel=2)
        mean, std = [0.0] * in_channels, [1.0] * in_channels
    model = create(ours, num_classes=num_classes, in_channels=in_channels, image_size=size, mean=list(mean),
                   std=list(std), **kw)
    ours_state = convert_state_dict(bb_name, state)
    expected = model.state_dict()
    for k in ("normalize.mean", "normalize.std"):
        ours_state[k] = expected[k]
    try:
        model.load_state_dict(ours_state, strict=True)
    except RuntimeError as e:
        raise UnbackdoorError(f"{path}: weights do not fit {ours}: {str(e).splitlines()[0]}") from None
    model.classes = [str(i) for i in range(num_classes)]
    model.import_report = {
        "source": str(path), "format": "backdoorbench", "model_name": bb_name, "dataset": dataset,
        "loader": report.loader, "skipped": dict(report.skipped),
        "ignored_entries": sorted(str(k) for k in obj if k != "model"),
    }
    if report.skipped:
        warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
    return model.eval()
