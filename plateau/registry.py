"""One registry class for every extension point (models, ops, calibrators, rounding methods, training methods).

    >>> CALIBRATORS = Registry("activation calibration")
    >>> @CALIBRATORS.register("minmax")
    ... def minmax(observer, qtype, cfg): ...
    >>> CALIBRATORS.get("kl2")
    PlateauError: unknown activation calibration 'kl2': choose from minmax, mse, percentile, kl

Entries keep their registration order (the order `names()` lists and the CLI offers them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import PlateauError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, filled by a decorator; an unknown name is a PlateauError listing the valid ones."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return deco

    def add(self, name: str, entry: T) -> T:
        return self.register(name)(entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise PlateauError(f"unknown {self.what} {name!r}: choose from {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
