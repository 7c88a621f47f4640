import numpy as np
import pytest

from allot.allocate import Options, uniform, uniform_sequence
from allot.exceptions import BudgetError, ConfigError


def _random_grid(rng):
    layers, size = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    costs = [rng.integers(0, 6, size) for _ in range(layers)]
    damages = [rng.integers(-3, 4, size).astype(float) for _ in range(layers)]
    return Options(costs, damages)


def test_uniform_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        options = _random_grid(rng)
        size = options.sizes[0]
        totals = [options.total([j] * options.num_layers) for j in range(size)]
        for max_cost in range(-1, int(options.max_cost()) + 2):
            fitting = [(d, c, j) for j, (c, d) in enumerate(totals) if c <= max_cost]
            if not fitting:
                with pytest.raises(BudgetError):
                    uniform(options, max_cost)
                continue
            assert uniform(options, max_cost) == [min(fitting)[2]] * options.num_layers


def test_budget_below_the_cheapest_uniform_plan_names_it():
    options = Options([[30, 10], [0, 5]], [[0.0, 1.0], [0.0, 1.0]])
    # The knapsack could meet 12 bits with [1, 0]; no uniform choice can.
    with pytest.raises(BudgetError, match=r"cheapest uniform plan \(15 bits\)"):
        uniform(options, 12)


def test_needs_one_shared_grid():
    options = Options([[1, 2], [1]], [[0, 1], [0]])
    with pytest.raises(ConfigError, match="same number of options"):
        uniform(options, 10)
    with pytest.raises(ConfigError, match="same number of options"):
        uniform_sequence(options)


def test_uniform_sequence_orders_every_grid_index_by_cost():
    options = Options([[4, 1, 2, 1], [4, 1, 2, 1]], [[0.0, 2.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]])
    # Grid 1 and 3 cost the same; 3 damages less.
    assert uniform_sequence(options) == [[3, 3], [1, 1], [2, 2], [0, 0]]
