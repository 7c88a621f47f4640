"""The greedy Lagrangian sweep: the whole convex cost/damage Pareto curve in one pass.

Per layer, only the options on the lower convex hull of (cost, damage) are used. The sweep starts
with every layer at its cheapest hull option and repeatedly takes the single upgrade (one layer one
step along its hull) that removes the most damage per extra bit. Every choice it passes through
minimises ``damage + lam * cost`` for some ``lam >= 0``, and such a choice has the least damage of
all choices that cost no more than it does: each point of the sweep is an exact knapsack optimum
for a budget equal to its own cost. Budgets between two points are served only approximately;
`allot.allocate.knapsack` is exact for every budget.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from allot.allocate.table import Options, nondominated
from allot.exceptions import BudgetError, ConfigError


def lower_hull(cost: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """Indices of one layer's options on the lower-left convex hull of (cost, damage).

    Ordered by increasing cost (and so decreasing damage); starts at the cheapest option (the least
    damaging of equally cheap ones) and ends at the least damaging (the cheapest of those). Options
    on a straight edge of the hull are kept, so the sweep can stop at each of them.
    """
    hull: list[int] = []
    for j in nondominated(cost, damage):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            # Cross product of (a - o) and (j - o): negative if a lies above the segment o-j.
            turn = (cost[a] - cost[o]) * (damage[j] - damage[o]) - (damage[a] - damage[o]) * (
                cost[j] - cost[o]
            )
            if turn >= 0:
                break
            hull.pop()
        hull.append(int(j))
    return np.array(hull, dtype=np.intp)


def pareto_sweep(options: Options) -> list[list[int]]:
    """Choices along the convex Pareto curve, from the cheapest to the least damaging.

    The first choice puts every layer at its cheapest option, the last every layer at its least
    damaging option (each the better one in the other quantity when there are several). Along the
    list total cost strictly increases and total damage strictly decreases (as real numbers; their
    float64 totals never decrease, resp. increase). Equal gains per bit are taken in layer order.
    """
    hulls = [lower_hull(c, d) for c, d in zip(options.costs, options.damages, strict=True)]

    def gain(i: int, k: int) -> float:
        """Damage removed per extra bit by moving layer i from hull point k to k + 1."""
        cost, damage, hull = options.costs[i], options.damages[i], hulls[i]
        return float((damage[hull[k]] - damage[hull[k + 1]]) / (cost[hull[k + 1]] - cost[hull[k]]))

    position = [0] * options.num_layers
    choice = [int(hull[0]) for hull in hulls]
    sweep = [choice.copy()]
    # Per layer the gains fall along the hull, so the best next upgrade is always a layer's next.
    upgrades = [(-gain(i, 0), i) for i, hull in enumerate(hulls) if hull.size > 1]
    heapq.heapify(upgrades)
    while upgrades:
        _, i = heapq.heappop(upgrades)
        position[i] += 1
        choice[i] = int(hulls[i][position[i]])
        sweep.append(choice.copy())
        if position[i] + 1 < hulls[i].size:
            heapq.heappush(upgrades, (-gain(i, position[i]), i))
    return sweep


def greedy(options: Options, max_cost: float) -> list[int]:
    """The least damaging point of `pareto_sweep` that costs at most ``max_cost`` bits.

    Raises BudgetError if even the cheapest choice costs more than ``max_cost``.
    """
    max_cost = options.check_budget(max_cost)
    best: list[int] = []
    for choice in pareto_sweep(options):
        if options.total(choice)[0] > max_cost:
            break
        best = choice
    return best


def greedy_within_damage(options: Options, max_damage: float) -> list[int]:
    """The cheapest point of `pareto_sweep` whose total damage is at most ``max_damage``.

    Raises BudgetError if even the least damaging choice damages more than ``max_damage``.
    """
    max_damage = float(max_damage)
    for choice in pareto_sweep(options):
        if options.total(choice)[1] <= max_damage:
            return choice
    raise BudgetError(
        f"damage limit {max_damage:.10g} is below the smallest damage reachable on the candidate "
        f"grid ({options.min_damage():.10g}); raise the limit or add less damaging candidates"
    )


def lagrangian(options: Options, lam: float) -> list[int]:
    """Per layer, the option minimising ``damage + lam * cost``; ``lam`` is damage per bit, >= 0.

    Ties go to the cheaper option, then to the lower index. The result has the least damage of all
    choices that cost no more than it does.
    """
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"lam must be a finite number >= 0 (damage per bit), got {lam}")
    choice = []
    for cost, damage in zip(options.costs, options.damages, strict=True):
        order = np.lexsort((np.arange(cost.size), cost, damage + lam * cost))
        choice.append(int(order[0]))
    return choice
