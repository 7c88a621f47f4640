"""The min-max allocator against brute force on small instances."""

import itertools

import numpy as np
import pytest

from allot.allocate import Options, minmax, minmax_within_damage, threshold_sequence
from allot.exceptions import BudgetError


def _random(seed: int) -> Options:
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(2, 5))
    sizes = rng.integers(1, 5, layers)
    costs = [rng.integers(1, 20, n).astype(float) for n in sizes]
    damages = [np.round(rng.uniform(0, 1, n), 2) for n in sizes]
    return Options(costs, damages)


@pytest.mark.parametrize("seed", range(40))
def test_the_least_largest_damage_within_every_budget(seed) -> None:
    options = _random(seed)
    choices = list(itertools.product(*(range(n) for n in options.sizes)))
    for budget in np.linspace(options.min_cost(), options.max_cost(), 7):
        fitting = [c for c in choices if options.total(c)[0] <= budget]
        best = min(
            max(float(d[j]) for d, j in zip(options.damages, c, strict=True)) for c in fitting
        )
        choice = minmax(options, budget)
        assert options.total(choice)[0] <= budget
        assert max(float(d[j]) for d, j in zip(options.damages, choice, strict=True)) == best


def test_the_threshold_family_is_monotone_and_damage_limits_bound_the_total() -> None:
    options = Options([[8, 4, 1], [6, 2]], [[0.0, 0.2, 0.9], [0.1, 0.5]])
    sequence = threshold_sequence(options)
    assert sequence == [[2, 1], [1, 1], [1, 0], [0, 0]]
    assert minmax_within_damage(options, 0.75) == [1, 1]  # total 0.7; [2, 1] totals 1.4
    assert minmax(options, 6) == [1, 1]
    with pytest.raises(BudgetError, match="raise the limit"):
        minmax_within_damage(options, 0.05)
