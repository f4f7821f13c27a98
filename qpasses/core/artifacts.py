"""Typed results one pass leaves for later ones, keyed by their class.

A pass that produces data for others (folded batch norms, channel means, the exported
encodings, SeqMSE results...) stores an instance of a class it owns; a reader asks for that
class and gets that type back, so the channel between two passes is a name the type checker
and a reader can follow, not a string key in a shared dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Artifacts:
    """One value per class. ``put`` stores by the value's own class; ``get``/``[]`` look it up."""

    def __init__(self) -> None:
        self._values: dict[type, Any] = {}

    def put(self, value: T) -> T:
        self._values[type(value)] = value
        return value

    def get(self, cls: type[T], default: T | None = None) -> T | None:
        value = self._values.get(cls)
        return default if value is None else value

    def __getitem__(self, cls: type[T]) -> T:
        try:
            return self._values[cls]
        except KeyError:
            raise KeyError(f"no {cls.__name__} artifact: the pass that produces it has not run") from None

    def setdefault(self, cls: type[T], factory: Callable[[], T] | None = None) -> T:
        """The stored value, or a new one (``factory()``, else ``cls()``) stored first."""
        if cls not in self._values:
            self._values[cls] = (factory or cls)()
        return self._values[cls]

    def pop(self, cls: type[T]) -> T | None:
        return self._values.pop(cls, None)

    def __contains__(self, cls: object) -> bool:
        return cls in self._values

    def __iter__(self) -> Iterator[type]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Artifacts({', '.join(sorted(c.__name__ for c in self._values))})"
