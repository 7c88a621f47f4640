"""Allocate: choose one candidate per layer under a budget.

`Options` holds every layer's candidate costs (bits) and predicted damages. Every allocator offers
the same three operations, so callers never branch on which one a method uses:

- `within_cost(options, max_cost)`: least damage whose total cost is at most `max_cost` bits;
- `within_damage(options, max_damage)`: least cost whose total damage is at most `max_damage`;
- `sequence(options)`: a curve of choices from the cheapest to the least damaging (the plans a
  lossless search walks through).

An allocator that can also limit a second cost (`Options.work`, multiply-accumulates) offers
`within_cost_and_work(options, max_cost, max_work)`; the knapsack does.

Registered allocators: ``"knapsack"`` (exact multiple-choice knapsack both ways, with the convex
Pareto sweep as its sequence), ``"greedy"`` (points of the convex Pareto sweep), ``"uniform"``
(the same grid index in every layer), ``"minmax"`` (the least largest per-layer damage: one
damage threshold for all layers, found exactly) and ``"alds"`` (ALDS's search for the same
objective: global thresholds alternating with a local choice of each layer's option family, from
15 seeds). New ones register with `register_allocator`.
"""

from collections.abc import Callable
from dataclasses import dataclass

from allot.allocate.alds import alds, alds_sequence, alds_within_damage
from allot.allocate.greedy import greedy, greedy_within_damage, lagrangian, lower_hull, pareto_sweep
from allot.allocate.knapsack import minimize_cost, minimize_damage
from allot.allocate.minmax import minmax, minmax_within_damage, threshold_sequence
from allot.allocate.table import Options, nondominated, screened
from allot.allocate.uniform import uniform, uniform_sequence, uniform_within_damage
from allot.registry import Registry

Choice = list[int]


@dataclass(frozen=True)
class Allocator:
    """An allocation rule: its three operations (see the module docstring); each raises
    BudgetError when nothing meets its limit."""

    name: str
    within_cost: Callable[[Options, float], Choice]
    within_damage: Callable[[Options, float], Choice]
    sequence: Callable[[Options], list[Choice]]
    description: str = ""
    within_cost_and_work: Callable[[Options, float, float], Choice] | None = None
    """Least damage within a cost and a work limit (`Options.work`), for allocators that can."""


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def register_allocator(allocator: Allocator) -> Allocator:
    """Register an allocator under its name (methods name it in `Method.allocator`)."""
    return ALLOCATORS.add(allocator.name, allocator)


def get_allocator(name: str) -> Allocator:
    """The registered allocator `name`; ConfigError listing the known ones otherwise."""
    return ALLOCATORS[name]


register_allocator(
    Allocator(
        "knapsack",
        minimize_damage,
        minimize_cost,
        pareto_sweep,
        "exact multiple-choice knapsack (HiGHS MILP)",
        minimize_damage,
    )
)
register_allocator(
    Allocator(
        "greedy",
        greedy,
        greedy_within_damage,
        pareto_sweep,
        "points of the convex Pareto sweep (exact at its own costs)",
    )
)
register_allocator(
    Allocator(
        "uniform",
        uniform,
        uniform_within_damage,
        uniform_sequence,
        "the same grid index in every layer",
    )
)

register_allocator(
    Allocator(
        "minmax",
        minmax,
        minmax_within_damage,
        threshold_sequence,
        "one damage threshold for every layer: the least largest per-layer damage",
    )
)

register_allocator(
    Allocator(
        "alds",
        alds,
        alds_within_damage,
        alds_sequence,
        "ALDS: per-layer family (groups) and shared threshold alternated from 15 seeds",
    )
)

__all__ = [
    "ALLOCATORS",
    "Allocator",
    "Choice",
    "Options",
    "alds",
    "alds_sequence",
    "alds_within_damage",
    "get_allocator",
    "greedy",
    "greedy_within_damage",
    "lagrangian",
    "lower_hull",
    "minimize_cost",
    "minimize_damage",
    "minmax",
    "minmax_within_damage",
    "nondominated",
    "pareto_sweep",
    "register_allocator",
    "screened",
    "threshold_sequence",
    "uniform",
    "uniform_sequence",
    "uniform_within_damage",
]
