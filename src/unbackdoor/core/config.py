"""Typed configs: dataclasses whose defaults are the papers' settings, presets,
and YAML override files. Unknown keys and wrongly typed values are errors that
name the key, so a typo never silently falls back to a default."""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, TypeVar

from unbackdoor.core.errors import UnbackdoorError
from unbackdoor.core.files import read_yaml

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def override(cfg: T, updates: dict[str, Any], where: str = "config") -> T:
    """Return a copy of dataclass ``cfg`` with ``updates`` applied (nested dicts for nested dataclasses)."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError("override expects a dataclass instance")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in (updates or {}).items():
        key = key.replace("-", "_")
        if key not in fields:
            raise UnbackdoorError(f"unknown key {where}.{key}; valid keys: {', '.join(sorted(fields))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UnbackdoorError(f"{where}.{key} must be a mapping")
            changes[key] = override(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints.get(key), f"{where}.{key}")
    return dataclasses.replace(cfg, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is None or hint is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UnbackdoorError:
                continue
        raise UnbackdoorError(f"{where}: {value!r} does not fit {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UnbackdoorError(f"{where} must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UnbackdoorError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UnbackdoorError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UnbackdoorError(f"{where} must be a string, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UnbackdoorError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        vals = [_coerce(v, inner, where) for v in value]
        return tuple(vals) if origin is tuple else vals
    if origin is dict:
        if not isinstance(value, dict):
            raise UnbackdoorError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def require_positive(where: str, **values: float) -> None:
    """A clear error for the first of ``values`` that is not > 0 (``where.key must be > 0``)."""
    for k, v in values.items():
        if not v > 0:
            raise UnbackdoorError(f"{where}.{k} must be > 0, got {v}")


def load_config(cfg: T, path: str | os.PathLike | None, section: str | None = None) -> T:
    """Apply a YAML file's overrides to ``cfg`` (optionally only its ``section`` mapping)."""
    if path is None:
        return cfg
    data = read_yaml(path)
    if section is not None and section in data and isinstance(data[section], dict):
        data = data[section]
    return override(cfg, data, where=section or "config")
