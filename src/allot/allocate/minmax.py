"""Min-max allocation: the plan whose most damaged layer is least damaged within a cost budget
(ALDS's global step; with relative weight error as the damage, SVD-Energy's rule).

For a threshold t, every layer takes its cheapest option whose damage is at most t (ties: the
less damaging, then the lower index). As t grows each layer's choice can only get cheaper and
more damaging, so the plan's total cost falls and its total damage rises with t, and the best
threshold for a budget is the smallest t at which the plan fits. It is one of the distinct damage
values, so bisection over their sorted list finds it exactly: root finding on a step function.

All three operations walk this one family of threshold plans: `minmax` the smallest threshold
within a cost, `minmax_within_damage` the largest threshold whose plan's *total* damage is within a
limit (damage limits mean the same for every allocator), `threshold_sequence` every plan of the
family, cheapest first.
"""

from __future__ import annotations

import numpy as np

from allot.allocate.table import Options
from allot.exceptions import BudgetError


def at_threshold(options: Options, threshold: float) -> list[int] | None:
    """Each layer's cheapest option with damage at most `threshold`, or None when some layer has
    none."""
    choice = []
    for cost, damage in zip(options.costs, options.damages, strict=True):
        allowed = np.flatnonzero(damage <= threshold)
        if allowed.size == 0:
            return None
        order = np.lexsort((allowed, damage[allowed], cost[allowed]))
        choice.append(int(allowed[order[0]]))
    return choice


def _thresholds(options: Options) -> np.ndarray:
    """The distinct damages at which some layer has an option at all, ascending: from the largest
    per-layer minimum up (below it some layer has no option)."""
    values = np.unique(np.concatenate(options.damages))
    floor = max(float(damage.min()) for damage in options.damages)
    return values[values >= floor]


def _smallest(thresholds: np.ndarray, fits) -> int | None:
    """The smallest index whose threshold fits, for `fits` monotone (false, ..., false, true, ...),
    or None when none fits."""
    if not fits(thresholds[-1]):
        return None
    low, high = 0, len(thresholds) - 1
    while low < high:
        middle = (low + high) // 2
        if fits(thresholds[middle]):
            high = middle
        else:
            low = middle + 1
    return low


def minmax(options: Options, max_cost: float) -> list[int]:
    """The threshold plan with the smallest largest damage whose total cost is at most
    ``max_cost`` bits. BudgetError when even the cheapest plan costs more."""
    max_cost = options.check_budget(max_cost)
    thresholds = _thresholds(options)

    def fits(threshold: float) -> bool:
        choice = at_threshold(options, threshold)
        return choice is not None and options.total(choice)[0] <= max_cost

    index = _smallest(thresholds, fits)
    if index is None:
        raise BudgetError(
            f"budget {max_cost:.10g} bits is below the cheapest min-max plan; raise the budget or "
            "add cheaper candidates"
        )
    choice = at_threshold(options, float(thresholds[index]))
    assert choice is not None
    return choice


def minmax_within_damage(options: Options, max_damage: float) -> list[int]:
    """The cheapest threshold plan whose total damage is at most ``max_damage``. BudgetError when
    even the least damaging threshold plan damages more."""
    max_damage = float(max_damage)
    thresholds = _thresholds(options)[::-1]  # descending: from the cheapest plan up

    def fits(threshold: float) -> bool:
        choice = at_threshold(options, threshold)
        return choice is not None and options.total(choice)[1] <= max_damage

    index = _smallest(thresholds, fits)
    if index is None:
        raise BudgetError(
            f"damage limit {max_damage:.10g} is below the least damaging min-max plan; raise the "
            "limit or add less damaging candidates"
        )
    choice = at_threshold(options, float(thresholds[index]))
    assert choice is not None
    return choice


def threshold_sequence(options: Options) -> list[list[int]]:
    """Every distinct threshold plan, from the cheapest (largest threshold) to the least
    damaging."""
    sequence: list[list[int]] = []
    for threshold in _thresholds(options)[::-1]:
        choice = at_threshold(options, float(threshold))
        if choice is not None and (not sequence or choice != sequence[-1]):
            sequence.append(choice)
    return sequence
