"""Methods are recipes, not class hierarchies: which schemes to consider for each layer (the grid),
which error model predicts their damage, and which allocator chooses among them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from allot.budget import Budget
from allot.registry import Registry
from allot.schemes import Grid

METHODS: Registry[Method] = Registry("method")


@dataclass(frozen=True)
class Method:
    """A named recipe. `grid(layer)` lists the schemes a layer may take (it sees the layer's name
    and geometry); `allocator` is a key of `allot.allocate.ALLOCATORS`; `error_model` a key of
    `allot.errors.ERROR_MODELS`; `refine`, if set, a key of `allot.refine.REFINERS` run on the
    applied plan with `refine_settings` (plain values for the refiner's settings dataclass);
    `search` a key of `allot.search.SEARCHES`, how a lossless budget searches the candidates;
    `budget`, if set, the budget the command line uses when the user gives none; `screen`, if
    set, the margin by which candidates are screened by their output error before the error
    model scores them (`allot.candidates`)."""

    name: str
    description: str
    grid: Grid
    error_model: str = "output"
    allocator: str = "knapsack"
    refine: str | None = None
    refine_settings: dict[str, Any] = field(default_factory=dict)
    search: str = "sequence"
    budget: Budget | None = None
    screen: float | None = None


def register_method(method: Method) -> Method:
    """Register a recipe under its name."""
    return METHODS.add(method.name, method)


def get_method(name: str) -> Method:
    """The registered method `name`; `ConfigError` listing the known ones otherwise."""
    return METHODS[name]
