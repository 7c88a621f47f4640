"""The uniform baseline: every layer takes the same grid index.

For grids where option ``j`` means the same setting in every layer (for example the same number of
bits), so that choice ``[j, j, ..., j]`` is "compress everything the same way".
"""

from __future__ import annotations

import math

from allot.allocate.table import Options
from allot.exceptions import BudgetError, ConfigError


def _grid_totals(options: Options) -> list[tuple[float, float]]:
    """Total (cost in bits, damage) of every uniform choice, by grid index."""
    sizes = set(options.sizes)
    if len(sizes) != 1:
        raise ConfigError(
            "uniform allocation needs one shared grid, the same number of options in every layer; "
            f"got {sorted(sizes)} options per layer"
        )
    (size,) = sizes
    return [
        (
            math.fsum(float(cost[j]) for cost in options.costs),
            math.fsum(float(damage[j]) for damage in options.damages),
        )
        for j in range(size)
    ]


def uniform_sequence(options: Options) -> list[list[int]]:
    """Every uniform choice ``[j] * num_layers``, by increasing total cost.

    Equal costs are ordered by damage, then by grid index. Raises ConfigError unless all layers
    have the same number of options.
    """
    totals = _grid_totals(options)
    order = sorted(range(len(totals)), key=lambda j: (*totals[j], j))
    return [[j] * options.num_layers for j in order]


def uniform(options: Options, max_cost: float) -> list[int]:
    """The uniform choice with the least total damage that costs at most ``max_cost`` bits.

    Ties go to the cheaper choice, then to the lower grid index. Raises ConfigError unless all
    layers have the same number of options, and BudgetError if no uniform choice fits.
    """
    max_cost = float(max_cost)
    totals = _grid_totals(options)
    fitting = [j for j, (cost, _) in enumerate(totals) if cost <= max_cost]
    if not fitting:
        cheapest = min(cost for cost, _ in totals)
        raise BudgetError(
            f"budget {max_cost:.10g} bits is below the cheapest uniform plan ({cheapest:.10g} "
            "bits); raise the budget, add a cheaper setting to the grid, or use the knapsack "
            "allocator"
        )
    best = min(fitting, key=lambda j: (totals[j][1], totals[j][0], j))
    return [best] * options.num_layers
