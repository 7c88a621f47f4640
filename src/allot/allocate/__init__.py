"""Allocate: choose one candidate per layer under a budget.

`Options` holds every layer's candidate costs (bits) and predicted damages. An allocator maps
``(options, max_cost)`` to one option index per layer; `ALLOCATORS` names them for methods:

- ``"knapsack"``: exact least damage within the budget (`minimize_damage`);
- ``"greedy"``: the best point of the convex Pareto sweep within the budget (`greedy`);
- ``"uniform"``: the same grid index in every layer (`uniform`).

`minimize_cost` solves the complementary problem (least cost under a damage limit);
`pareto_sweep` and `uniform_sequence` list whole curves of choices, cheapest first.
"""

from collections.abc import Callable

from allot.allocate.greedy import greedy, lagrangian, lower_hull, pareto_sweep
from allot.allocate.knapsack import minimize_cost, minimize_damage
from allot.allocate.table import Options, nondominated
from allot.allocate.uniform import uniform, uniform_sequence

Allocator = Callable[[Options, float], list[int]]
"""Maps (options, budget in bits) to one option index per layer; BudgetError if nothing fits."""

ALLOCATORS: dict[str, Allocator] = {
    "knapsack": minimize_damage,
    "greedy": greedy,
    "uniform": uniform,
}

__all__ = [
    "ALLOCATORS",
    "Allocator",
    "Options",
    "greedy",
    "lagrangian",
    "lower_hull",
    "minimize_cost",
    "minimize_damage",
    "nondominated",
    "pareto_sweep",
    "uniform",
    "uniform_sequence",
]
