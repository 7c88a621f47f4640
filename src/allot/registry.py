"""One registry helper for everything allot looks up by name: schemes, methods, error models,
allocators, refiners, zoo models and data sets.

A `Registry` maps names to entries in registration order. Registering a name twice is a programming
error (`ValueError`); looking up an unknown name raises the registry's `AllotError` subclass with
one message shape for all of them: "unknown method 'x'; known: a, b, c".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from allot.exceptions import AllotError, ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (`kind` names it in messages, e.g. "method")."""

    def __init__(self, kind: str, error: type[AllotError] = ConfigError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name` and return it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda entry: self.add(name, entry)

    def __getitem__(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def get(self, name: str, default: T | None = None) -> T | None:
        """The entry under `name`, or `default` when there is none (as `dict.get`)."""
        return self._entries.get(name, default)

    def __setitem__(self, name: str, entry: T) -> None:
        """Register or replace an entry (for tests and deliberate overrides; `add` refuses)."""
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order."""
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())
