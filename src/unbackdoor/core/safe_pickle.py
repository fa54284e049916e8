"""Read pickles from strangers without running them.

A pickle names globals (``module.name``) and the unpickler imports and calls
them: that is how a file runs code. :class:`SafeUnpickler` never imports a
module; each global the file names is, in this order,

1. on the allow-list: replaced by our own, checked rebuilder (numpy arrays,
   dtypes and scalars, plain containers; tensors and storages for torch files),
   never by the real function;
2. from a module that can run code or touch the system (``os``, ``subprocess``,
   ``builtins`` beyond the allow-list, any ``torch`` / ``numpy`` function, most
   of the standard library, ...): the whole file is refused, since no data file
   needs one and a file that names one may be malicious;
3. anything else (a third-party class such as ``PIL.Image.Image``): refused
   too, unless the caller asks for stand-ins; then it becomes an inert
   :class:`Placeholder` subclass that only stores what the pickle passes it,
   and the :class:`UnpickleReport` counts the objects built from it.

Entry points: :func:`loads` (bytes), :func:`load_pickle` (a pickle file) and
:func:`load_torch` (a ``torch.save`` file: torch's own weights-only reader
first, then ours on the zip archive, for files that need stand-ins).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np
import torch

from unbackdoor.core.errors import UnbackdoorError

# Standard-library modules whose classes are harmless data: they may become stand-ins
# like any third-party class. Every other stdlib module can reach code or I/O.
_INERT_STDLIB = frozenset({"collections", "datetime", "argparse", "pathlib", "enum", "decimal", "fractions", "uuid",
                           "typing", "dataclasses", "numbers", "ipaddress"})
# Third-party packages whose globals can run code (or load more pickles): never stand-ins.
_POWERFUL_THIRD_PARTY = frozenset({"torch", "numpy", "dill", "cloudpickle", "joblib", "yaml", "pip", "setuptools",
                                   "pkg_resources", "IPython"})


def _may_run_code(module: str) -> bool:
    top = module.split(".")[0]
    if top == "builtins" or top in _POWERFUL_THIRD_PARTY:
        return True
    return top in sys.stdlib_module_names and top not in _INERT_STDLIB


# ---------------------------------------------------------------------------- report
@dataclass
class UnpickleReport:
    """What a load did: which reader worked and which untrusted globals got stand-ins."""

    loader: str = ""  # "weights_only" (torch's own reader) or "restricted" (ours)
    replaced: dict[str, int] = field(default_factory=dict)  # "module.name" -> objects built from its stand-in

    @property
    def objects(self) -> int:
        """Number of objects built from stand-ins (a class named but never instantiated counts 0)."""
        return sum(self.replaced.values())

    def summary(self) -> str:
        reader = "torch's weights-only" if self.loader == "weights_only" else "the restricted"
        if not self.replaced:
            return f"loaded with {reader} unpickler; nothing replaced"
        names = ", ".join(f"{k} (x{v})" for k, v in sorted(self.replaced.items()))
        return (f"loaded with {reader} unpickler; {self.objects} object(s) of {len(self.replaced)} untrusted "
                f"class(es) were NOT rebuilt (inert placeholders): {names}")


# ---------------------------------------------------------------------------- stand-ins
class Placeholder:
    """An inert stand-in for a class or function the file names but we do not trust.

    One subclass is made per name and per load; calling it, ``__new__``-ing it
    or giving it state only stores what the pickle passed (``_args``,
    ``_kwargs``, ``_state``, ``_items``) and counts the object in the report.
    """

    _module: str = "?"
    _name: str = "?"
    _report: UnpickleReport | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_kwargs", kwargs)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", [])
        # Every way a pickle builds an object of the class (NEWOBJ, NEWOBJ_EX, REDUCE,
        # INST/OBJ, copyreg._reconstructor) comes through here, once per object.
        if cls._report is not None:
            label = f"{cls._module}.{cls._name}"
            cls._report.replaced[label] = cls._report.replaced.get(label, 0) + 1
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # nothing to run
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


def _placeholder_class(module: str, name: str, report: UnpickleReport) -> type:
    return type(f"Skipped[{module}.{name}]", (Placeholder,), {"_module": module, "_name": name, "_report": report})


# ---------------------------------------------------------------------------- checked rebuilders
def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy array rebuilt with a non-ndarray type")
    # numpy pickles an empty (0,) array and fills it with BUILD; a bigger one would only allocate.
    if not isinstance(shape, tuple) or len(shape) != 1 or shape[0] != 0:
        raise pickle.UnpicklingError(f"numpy array rebuilt with shape {shape!r:.40}, not (0,)")
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _np_dtype(*args: Any) -> np.dtype:
    # Python 2 pickles (CIFAR) read with encoding="bytes" spell the type code as bytes.
    if not args or not isinstance(args[0], (str, bytes)):
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
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode(encoding, errors)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # Protocol 0/1 pickles of plain classes: copyreg._reconstructor(cls, object, None);
    # of list / dict subclasses: copyreg._reconstructor(cls, list, [items]).
    if base not in (object, list, dict):
        raise pickle.UnpicklingError(f"copyreg._reconstructor with base {base!r:.80}")
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        obj = cls()
        if state is not None:
            object.__setattr__(obj, "_items", list(state.items()) if isinstance(state, dict) else list(state))
        return obj
    if cls is collections.OrderedDict:
        return collections.OrderedDict(state or ())
    raise pickle.UnpicklingError(f"copyreg._reconstructor of a non-placeholder {cls!r:.80}")


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Protocol 5 pickles of numpy arrays: numpy._core.numeric._frombuffer(buffer, dtype, shape, order).
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy array rebuilt from something that is not a buffer")
    if dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy array rebuilt with an object dtype or an unknown order")
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("malformed numpy array shape") from None
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


NUMPY_GLOBALS: Mapping[tuple[str, str], Any] = {
    **{(mod, "_reconstruct"): _np_reconstruct for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "scalar"): _np_scalar for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "_frombuffer"): _np_frombuffer for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
}
"""numpy arrays, dtypes and scalars (plain-number dtypes; object arrays hold what the pickle holds)."""

DATA_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    # bare types, named by protocol 0/1 pickles of plain objects (copyreg._reconstructor's base)
    ("builtins", "object"): object,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    **NUMPY_GLOBALS,
}
"""The default allow-list: plain containers, bytes written by protocol 2, and numpy data."""


# ---------------------------------------------------------------------------- the unpickler
class SafeUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that never imports: globals come from ``allow``
    (``(module, name) -> object``), become :class:`Placeholder` stand-ins when
    ``stand_ins`` is true, or make the load fail with :class:`pickle.UnpicklingError`
    (see the module docstring for the rules). ``self.report`` says what was replaced."""

    def __init__(self, file: BinaryIO, *, allow: Mapping[tuple[str, str], Any] = DATA_GLOBALS,
                 stand_ins: bool = False, encoding: str = "ASCII", report: UnpickleReport | None = None):
        super().__init__(file, encoding=encoding)
        self.allow = allow
        self.stand_ins = stand_ins
        self.report = report if report is not None else UnpickleReport(loader="restricted")
        self._placeholders: dict[tuple[str, str], type] = {}

    def load(self) -> Any:
        try:
            return super().load()
        finally:  # objects made from a stand-in later (copies, ...) are not the file's
            for cls in self._placeholders.values():
                cls._report = None

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles may name Python 2 modules (__builtin__.set, copy_reg, ...).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in self.allow:
            return self.allow[key]
        label = f"{module}.{name}"
        if _may_run_code(module):
            raise pickle.UnpicklingError(
                f"refusing {label}: the file asks to call code that no data file needs (it may be malicious)")
        if not self.stand_ins:
            raise pickle.UnpicklingError(f"refusing {label}: not an allowed global (only plain data is read here)")
        if key not in self._placeholders:
            self.report.replaced.setdefault(label, 0)  # named, even if no object of it is ever built
            self._placeholders[key] = _placeholder_class(module, name, self.report)
        return self._placeholders[key]


def loads(data: bytes, *, allow: Mapping[tuple[str, str], Any] = DATA_GLOBALS, stand_ins: bool = False,
          encoding: str = "ASCII") -> tuple[Any, UnpickleReport]:
    """Unpickle ``data`` with :class:`SafeUnpickler`; raises :class:`pickle.UnpicklingError` on refusal."""
    unpickler = SafeUnpickler(io.BytesIO(data), allow=allow, stand_ins=stand_ins, encoding=encoding)
    return unpickler.load(), unpickler.report


def load_pickle(path: str | os.PathLike, *, allow: Mapping[tuple[str, str], Any] = DATA_GLOBALS,
                stand_ins: bool = False, encoding: str = "ASCII") -> tuple[Any, UnpickleReport]:
    """Unpickle the file ``path`` safely; any failure is an :class:`UnbackdoorError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            unpickler = SafeUnpickler(f, allow=allow, stand_ins=stand_ins, encoding=encoding)
            return unpickler.load(), unpickler.report
    except FileNotFoundError:
        raise UnbackdoorError(f"file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - whatever a hostile or broken file causes, it is a bad file
        raise UnbackdoorError(f"corrupted or unsafe pickle {path}: {e}") from None


# ---------------------------------------------------------------------------- torch files
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


TORCH_GLOBALS: Mapping[tuple[str, str], Any] = {
    **DATA_GLOBALS,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "Tensor"): _TENSOR_TYPE,  # only ever an argument of _rebuild_from_type_v2
    ("torch", "device"): str,  # a device name is all we keep
    **{("torch", n): _StorageType(dt) for n, dt in _STORAGE_DTYPES.items()},
    **{("torch", n): dt for n, dt in _TORCH_DTYPES.items()},
}
""":data:`DATA_GLOBALS` plus what ``torch.save`` writes for tensors (rebuilt from the archive's raw bytes)."""


class _TorchArchiveUnpickler(SafeUnpickler):
    """Reads ``<root>/data.pkl`` of a torch zip archive; storages come from ``<root>/data/<key>``."""

    def __init__(self, file: BinaryIO, archive: zipfile.ZipFile, root: str, *, stand_ins: bool):
        super().__init__(file, allow=TORCH_GLOBALS, stand_ins=stand_ins, encoding="utf-8")
        self._archive = archive
        self._root = root
        self._storages: dict[str, _Storage] = {}
        self._byteorder = "little"
        name = f"{root}/byteorder"
        if name in archive.namelist():
            self._byteorder = archive.read(name).decode().strip() or "little"

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


def _load_torch_archive(path: Path, stand_ins: bool) -> tuple[Any, UnpickleReport]:
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
        unpickler = _TorchArchiveUnpickler(io.BytesIO(archive.read(pkls[0])), archive, root, stand_ins=stand_ins)
        try:
            return unpickler.load(), unpickler.report
        except pickle.UnpicklingError as e:
            raise UnbackdoorError(f"refusing to load {path}: {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
            raise UnbackdoorError(f"corrupted checkpoint {path}: {type(e).__name__}: {e}") from None


def load_torch(path: str | os.PathLike, *, stand_ins: bool = False) -> tuple[Any, UnpickleReport]:
    """Read a ``torch.save`` file without running it.

    torch's own ``weights_only`` reader goes first (tensors and plain
    containers); a file it refuses is read again by :class:`SafeUnpickler` on
    the zip archive, with stand-ins for untrusted classes if ``stand_ins``.
    Refused, corrupted or missing files raise :class:`UnbackdoorError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UnbackdoorError(f"file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return _load_torch_archive(path, stand_ins)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        # torch reports some refusals as RuntimeError; the restricted reader decides.
        if zipfile.is_zipfile(path):
            return _load_torch_archive(path, stand_ins)
        raise UnbackdoorError(f"corrupted or unsupported checkpoint {path}: {str(e).splitlines()[0]}") from None
    return obj, UnpickleReport(loader="weights_only")
