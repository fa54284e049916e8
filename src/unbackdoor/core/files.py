"""Atomic file output and output-directory safety.

Every file the tool writes goes to a temporary sibling first and is renamed
into place, so a killed run never leaves a truncated file behind.

An output folder is held by one process at a time: :func:`prepare_out_dir` takes
an exclusive ``flock`` on the folder's :data:`OUTPUT_LOCK` file (holding the
writer's pid) and :func:`release_out_dir` lets it go. Two runs resuming the same
folder would otherwise interleave their checkpoints; the operating system drops
the lock of a killed process, so a killed run never blocks its own resume.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from unbackdoor.core.errors import OutputExists, OutputInUse, UnbackdoorError

if sys.platform != "win32":
    import fcntl
else:  # no flock: folders are not locked there
    fcntl = None

OUTPUT_LOCK = ".lock"  # in every output folder while a process writes it (module docstring)
_HELD: dict[str, list[int]] = {}  # resolved folder -> [fd of its lock file, times acquired] in this process


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(plain(obj), sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UnbackdoorError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UnbackdoorError(f"corrupted JSON file {path}: {e}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UnbackdoorError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        # PyYAML's messages span several lines (with a source excerpt); keep one line.
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise UnbackdoorError(f"invalid YAML in {path}{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UnbackdoorError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def plain(obj: Any) -> Any:
    """Tuples, Paths and numpy scalars (nested in dicts and lists) as YAML / JSON-safe plain values."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except Exception:  # noqa: BLE001
            return obj
    return obj


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def lock_out_dir(path: str | os.PathLike) -> None:
    """Take this process's exclusive hold of the existing folder ``path``; an
    :class:`OutputInUse` if another process holds it. Re-entrant within a process."""
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    if fcntl is None:
        _HELD[key] = [-1, 1]
        return
    lock = path / OUTPUT_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputInUse(f"output directory {path} is being written by another process{_holder(lock)}; "
                          "wait for it to finish or choose another output folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]


def release_out_dir(path: str | os.PathLike) -> None:
    """Undo one :func:`lock_out_dir` of ``path`` by this process (nothing if it holds none)."""
    key = str(Path(path).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        if held[0] >= 0:
            os.close(held[0])  # closing drops the flock; the file stays, harmless


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != OUTPUT_LOCK]


def prepare_out_dir(path: str | os.PathLike, *, force: bool = False, resume: bool = False, lock: bool = True) -> Path:
    """Check that ``path`` may be written; never silently overwrite a non-empty folder.

    - empty or missing: fine (created);
    - non-empty with ``resume``: fine, the caller continues from its checkpoints;
    - non-empty with ``force``: the old contents are removed;
    - otherwise an :class:`OutputExists`.

    With ``lock`` (the default; only the process that writes should ask) the folder is
    then held by this process (:func:`lock_out_dir`) until :func:`release_out_dir`, and
    a folder another live process holds is an :class:`OutputInUse`, checked before
    anything is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnbackdoorError(f"output path {path} exists and is not a directory")
    if path.is_dir() and _contents(path) and not (resume or force):
        raise OutputExists(f"output directory {path} exists and is not empty", resumable=True)
    path.mkdir(parents=True, exist_ok=True)
    if lock:
        lock_out_dir(path)
    if force and not resume:
        try:
            for child in _contents(path):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        except BaseException:
            if lock:
                release_out_dir(path)
            raise
    return path


@contextlib.contextmanager
def rollback_on_failure(out: Path | None, was_missing: bool, enabled: bool = True) -> Iterator[None]:
    """Undo a run's output folder when the run fails before writing its first checkpoint.

    A run that cannot resume (no ``*.pt`` under ``out``) leaves ``out`` as it found it:
    removed if it did not exist (``was_missing``), emptied otherwise. After a
    checkpoint the folder is kept, so ``--resume`` can continue it. Either way this
    process's hold of ``out`` (:func:`prepare_out_dir`) ends here."""
    try:
        yield
    except BaseException:
        if enabled and out is not None and out.is_dir() and not any(out.rglob("*.pt")):
            if was_missing:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for child in out.iterdir():
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise
    finally:
        if out is not None:
            release_out_dir(out)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build a whole output folder in a temporary sibling and move it into place at the end.

    Used by one-shot commands (``poison``): a failure leaves nothing behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnbackdoorError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExists(f"output directory {path} exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
