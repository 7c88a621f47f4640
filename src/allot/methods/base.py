"""Methods are recipes, not class hierarchies: which schemes to consider for each layer (the grid),
which error model predicts their damage, and which allocator chooses among them."""

from __future__ import annotations

from dataclasses import dataclass

from allot.candidates import Grid
from allot.exceptions import ConfigError

METHODS: dict[str, Method] = {}


@dataclass(frozen=True)
class Method:
    """A named recipe. `allocator` is a key of `allot.allocate.ALLOCATORS`; `error_model` a key of
    `allot.errors.ERROR_MODELS`; `refine`, if set, a key of `allot.refine.REFINERS` run on the
    applied plan."""

    name: str
    description: str
    grid: Grid
    error_model: str = "output"
    allocator: str = "knapsack"
    refine: str | None = None


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method `name`; `ConfigError` listing the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
