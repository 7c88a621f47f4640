"""One conformance suite run over every registered allocator.

An allocator offers three operations on the same options: least damage within a cost
(`within_cost`), least cost within a damage (`within_damage`) and a curve of choices from the
cheapest to the least damaging (`sequence`). Each must respect its limit, raise BudgetError when
nothing meets it, be monotone in its limit, never beat the exact knapsack, and give the same answer
for the same input. New entries of ALLOCATORS are tested here automatically.
"""

import math

import numpy as np
import pytest

from allot.allocate import ALLOCATORS, Options
from allot.exceptions import BudgetError

NAMES = sorted(ALLOCATORS)


def test_covers_every_allocator():
    assert set(NAMES) == set(ALLOCATORS) and len(NAMES) == len(ALLOCATORS)


def _grid_options(seed: int) -> Options:
    """Layers of different sizes on one shared bit grid (so uniform applies): cost = weights x
    bits + scale bits; damage falls with bits like 4**-bits, with noise, negative at times."""
    rng = np.random.default_rng(seed)
    bits = np.array([1, 2, 3, 4, 6, 8])
    layers = int(rng.integers(3, 9))
    weights = rng.integers(100, 10_000, layers)
    costs = [w * bits + 16 * rng.integers(1, 8) for w in weights]
    damages = [
        rng.uniform(0.1, 10) * 4.0 ** (-bits) + rng.normal(0, 0.01, bits.size) for _ in weights
    ]
    return Options(costs, damages)


CASES = [_grid_options(seed) for seed in range(8)]


def _budgets(options: Options) -> list[float]:
    low, high = options.min_cost(), options.max_cost()
    return [low, *np.linspace(low, high, 13)[1:-1].tolist(), high, high * 2, math.inf]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_budget_respected_and_monotone(name, case):
    allocate, options = ALLOCATORS[name].within_cost, CASES[case]
    feasible_before = False
    damage_before = math.inf
    for max_cost in _budgets(options):
        try:
            choice = allocate(options, max_cost)
        except BudgetError:
            # A plan that fits a budget fits every larger budget.
            assert not feasible_before
            continue
        assert len(choice) == options.num_layers
        assert all(
            isinstance(j, int) and 0 <= j < n for j, n in zip(choice, options.sizes, strict=True)
        )
        cost, damage = options.total(choice)
        assert cost <= max_cost
        assert damage <= damage_before
        feasible_before, damage_before = True, damage
    assert feasible_before, "the largest budgets must be met"


@pytest.mark.parametrize("name", NAMES)
def test_infeasible_budget_raises_budget_error(name):
    options = CASES[0]
    for max_cost in (options.min_cost() - 1, 0.0, -1.0, -math.inf, math.nan):
        with pytest.raises(BudgetError, match="raise the budget"):
            ALLOCATORS[name].within_cost(options, max_cost)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    options = CASES[1]
    max_cost = (options.min_cost() + options.max_cost()) / 2
    first = ALLOCATORS[name].within_cost(options, max_cost)
    again = Options(list(options.costs), list(options.damages))
    for _ in range(3):
        assert ALLOCATORS[name].within_cost(options, max_cost) == first
        assert ALLOCATORS[name].within_cost(again, max_cost) == first


@pytest.mark.parametrize("name", NAMES)
def test_never_beats_the_exact_knapsack(name):
    exact = ALLOCATORS["knapsack"]
    for options in CASES[:4]:
        for max_cost in _budgets(options):
            try:
                damage = options.total(ALLOCATORS[name].within_cost(options, max_cost))[1]
            except BudgetError:
                continue
            assert damage >= options.total(exact.within_cost(options, max_cost))[1]


def _limits(options: Options) -> list[float]:
    high = max(options.total(c)[1] for c in ALLOCATORS["knapsack"].sequence(options))
    low = options.min_damage()
    return [low, *np.linspace(low, high, 11)[1:].tolist(), high + 1, math.inf]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", range(4))
def test_damage_limit_respected_monotone_and_never_cheaper_than_exact(name, case):
    options = CASES[case]
    cost_before, feasible_before = math.inf, False
    for limit in _limits(options):
        try:
            choice = ALLOCATORS[name].within_damage(options, limit)
        except BudgetError:
            assert not feasible_before  # a looser limit is met whenever a tighter one is
            continue
        cost, damage = options.total(choice)
        assert damage <= limit
        assert cost <= cost_before  # a looser limit never costs more
        exact = ALLOCATORS["knapsack"].within_damage(options, limit)
        assert cost >= options.total(exact)[0]
        cost_before, feasible_before = cost, True
    assert feasible_before, "an unlimited damage must be met"


@pytest.mark.parametrize("name", NAMES)
def test_damage_limit_below_every_plan_raises_budget_error(name):
    options = CASES[2]
    for limit in (options.min_damage() - 1, -math.inf, math.nan):
        with pytest.raises(BudgetError, match="raise the limit"):
            ALLOCATORS[name].within_damage(options, limit)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", range(4))
def test_sequence_runs_from_the_cheapest_up(name, case):
    options = CASES[case]
    sequence = ALLOCATORS[name].sequence(options)
    totals = [options.total(choice) for choice in sequence]
    assert sequence and all(len(choice) == options.num_layers for choice in sequence)
    costs = [cost for cost, _ in totals]
    assert costs == sorted(costs)
    assert costs[0] == min(options.total(c)[0] for c in sequence)
    assert ALLOCATORS[name].sequence(options) == sequence
