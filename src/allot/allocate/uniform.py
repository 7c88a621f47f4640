"""The uniform baseline: every layer takes the same grid index.

For grids where option ``j`` means the same setting in every layer (for example the same number of
bits), so that choice ``[j, j, ..., j]`` is "compress everything the same way". Layers with a
single option (kept in float or pinned by the user's per-layer policy) take it in every choice.
"""

from __future__ import annotations

from allot.allocate.table import Options
from allot.exceptions import BudgetError, ConfigError


def _grid_size(options: Options) -> int:
    """The shared grid's size: the number of options of every layer that has more than one."""
    sizes = {size for size in options.sizes if size > 1}
    if len(sizes) > 1:
        raise ConfigError(
            "uniform allocation needs one shared grid, the same number of options in every layer "
            f"(or a single fixed one); got {sorted(sizes)} options per layer"
        )
    return sizes.pop() if sizes else 1


def _choice(options: Options, j: int) -> list[int]:
    """Grid index `j` in every layer, 0 in single-option layers."""
    return [j if size > 1 else 0 for size in options.sizes]


def _grid_totals(options: Options) -> list[tuple[float, float]]:
    """Total (cost in bits, damage) of every uniform choice, by grid index."""
    return [options.total(_choice(options, j)) for j in range(_grid_size(options))]


def uniform_sequence(options: Options) -> list[list[int]]:
    """Every uniform choice, by increasing total cost.

    Equal costs are ordered by damage, then by grid index. Raises ConfigError unless all layers
    with more than one option have the same number of options.
    """
    totals = _grid_totals(options)
    order = sorted(range(len(totals)), key=lambda j: (*totals[j], j))
    return [_choice(options, j) for j in order]


def uniform(options: Options, max_cost: float) -> list[int]:
    """The uniform choice with the least total damage that costs at most ``max_cost`` bits.

    Ties go to the cheaper choice, then to the lower grid index. Raises ConfigError unless all
    layers with several options have the same number, and BudgetError if no uniform choice fits.
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
    return _choice(options, best)


def uniform_within_damage(options: Options, max_damage: float) -> list[int]:
    """The cheapest uniform choice whose total damage is at most ``max_damage`` (ties: the less
    damaging, then the lower grid index). BudgetError if no uniform choice is within the limit."""
    max_damage = float(max_damage)
    totals = _grid_totals(options)
    within = [j for j, (_, damage) in enumerate(totals) if damage <= max_damage]
    if not within:
        least = min(damage for _, damage in totals)
        raise BudgetError(
            f"damage limit {max_damage:.10g} is below the least damaging uniform plan "
            f"({least:.10g}); raise the limit or use the knapsack allocator"
        )
    best = min(within, key=lambda j: (totals[j][0], totals[j][1], j))
    return _choice(options, best)
