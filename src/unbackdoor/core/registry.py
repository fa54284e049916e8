"""A name -> object registry with the error every registry gives for an unknown name."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from unbackdoor.core.errors import unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name, in registration order. ``kind`` names them in errors ("defense")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T, *, replace: bool = False) -> T:
        if name in self._items and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._items[name] = obj
        return obj

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, list(self._items)) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))
