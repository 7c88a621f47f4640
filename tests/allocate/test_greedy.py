import itertools

import numpy as np
import pytest

from allot.allocate import Options, greedy, lagrangian, lower_hull, pareto_sweep
from allot.exceptions import BudgetError, ConfigError

from .cases import KINDS, all_totals, random_options


def _least_damage_within(totals, max_cost):
    return min(d for c, d in totals if c <= max_cost)


def test_lower_hull_example():
    cost = np.array([0, 1, 2, 4, 6, 7, 3], dtype=float)
    damage = np.array([8, 7, 4, 2, 0, 0, 9], dtype=float)
    # 1 lies above the segment 0-2; 3 lies on the segment 2-4 and is kept; 5 and 6 are dominated.
    assert lower_hull(cost, damage).tolist() == [0, 2, 3, 4]


def test_lower_hull_is_convex_and_covers_every_option():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        cost, damage = rng.integers(0, 6, n).astype(float), rng.normal(size=n)
        hull = lower_hull(cost, damage)
        assert np.all(np.diff(cost[hull]) > 0) and np.all(np.diff(damage[hull]) < 0)
        slopes = np.diff(damage[hull]) / np.diff(cost[hull])
        assert np.all(np.diff(slopes) >= 0)
        # No option lies below the hull; options beyond its costliest end damage no less.
        for c, d in zip(cost, damage, strict=True):
            assert d >= np.interp(c, cost[hull], damage[hull]) - 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_every_sweep_point_is_an_exact_optimum_for_its_cost(kind):
    rng = np.random.default_rng(20 + KINDS.index(kind))
    for _ in range(40):
        options = random_options(rng, kind)
        totals = all_totals(options)
        sweep = pareto_sweep(options)
        points = [options.total(choice) for choice in sweep]
        for (c0, d0), (c1, d1) in itertools.pairwise(points):
            assert c0 <= c1 and d0 >= d1
        for cost, damage in points:
            assert damage == _least_damage_within(totals, cost)
        # Ends: the cheapest choice (least damaging of those), and the least damaging one
        # (cheapest of those).
        assert points[0] == min(totals)
        assert points[-1] == min(totals, key=lambda t: (t[1], t[0]))
        hulls = [lower_hull(c, d) for c, d in zip(options.costs, options.damages, strict=True)]
        assert len(sweep) == 1 + sum(hull.size - 1 for hull in hulls)


def test_sweep_takes_the_best_upgrade_first():
    # Layer 0 gains 4 per bit then 1 per bit; layer 1 gains 2 per bit.
    options = Options([[0, 1, 2], [0, 1]], [[5.0, 1.0, 0.0], [2.0, 0.0]])
    assert pareto_sweep(options) == [[0, 0], [1, 0], [1, 1], [2, 1]]


def test_greedy_takes_the_last_sweep_point_within_the_budget():
    rng = np.random.default_rng(1)
    for _ in range(40):
        options = random_options(rng, "float")
        sweep = pareto_sweep(options)
        costs = [options.total(choice)[0] for choice in sweep]
        for max_cost in np.linspace(options.min_cost(), options.max_cost() + 1, 7):
            choice = greedy(options, max_cost)
            last = max(i for i, c in enumerate(costs) if c <= max_cost)
            assert choice == sweep[last]
        with pytest.raises(BudgetError, match="smallest plan"):
            greedy(options, options.min_cost() - 1)


def test_lagrangian_choices_are_exact_optima_for_their_cost():
    rng = np.random.default_rng(2)
    for _ in range(40):
        options = random_options(rng, "int")
        totals = all_totals(options)
        for lam in (0.0, 0.1, 0.5, 1.0, 3.0, 1e6):
            cost, damage = options.total(lagrangian(options, lam))
            assert damage == _least_damage_within(totals, cost)
        assert options.total(lagrangian(options, 0.0))[1] == options.min_damage()
        assert options.total(lagrangian(options, 1e6))[0] == options.min_cost()


def test_lagrangian_breaks_ties_by_cost_then_index():
    options = Options([[2, 1, 1, 3]], [[0.0, 1.0, 1.0, -1.0]])
    assert lagrangian(options, 1.0) == [1]  # 2, 2, 2, 2: cheapest, then lowest index


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf")])
def test_lagrangian_rejects_bad_multipliers(lam):
    with pytest.raises(ConfigError, match="lam"):
        lagrangian(Options([[1]], [[1]]), lam)
