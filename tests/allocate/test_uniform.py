import numpy as np
import pytest

from allot.allocate import Options, uniform, uniform_sequence, uniform_within_damage
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
    options = Options([[1, 2], [1, 2, 3]], [[0, 1], [0, 1, 2]])
    with pytest.raises(ConfigError, match="same number of options"):
        uniform(options, 10)
    with pytest.raises(ConfigError, match="same number of options"):
        uniform_sequence(options)


def test_single_option_layers_are_fixed_and_the_others_share_the_grid():
    """A layer the user kept or pinned has one option; uniform moves every other layer together."""
    options = Options([[4, 2, 1], [7], [8, 4, 2]], [[0.0, 1.0, 3.0], [0.5], [0.0, 1.0, 2.0]])
    # uniform choices: [0, 0, 0] costs 19 (damage 0.5), [1, 0, 1] 13 (2.5), [2, 0, 2] 10 (5.5)
    assert uniform(options, 12.0) == [2, 0, 2]
    assert uniform(options, 13.0) == [1, 0, 1]
    assert uniform_sequence(options) == [[2, 0, 2], [1, 0, 1], [0, 0, 0]]
    assert uniform_within_damage(options, 2.5) == [1, 0, 1]


def test_uniform_sequence_orders_every_grid_index_by_cost():
    options = Options([[4, 1, 2, 1], [4, 1, 2, 1]], [[0.0, 2.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]])
    # Grid 1 and 3 cost the same; 3 damages less.
    assert uniform_sequence(options) == [[3, 3], [1, 1], [2, 2], [0, 0]]
