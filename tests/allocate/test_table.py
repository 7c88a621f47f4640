import itertools

import numpy as np
import pytest

from allot.allocate import Options, nondominated
from allot.exceptions import ConfigError, PlanError


def test_stores_read_only_float64_vectors():
    options = Options([[1, 2], [3]], [[0.5, -1], [2]])
    assert isinstance(options.costs, tuple) and isinstance(options.damages, tuple)
    for vector in (*options.costs, *options.damages):
        assert vector.dtype == np.float64 and vector.ndim == 1
        with pytest.raises(ValueError):
            vector[0] = 7
    assert options.num_layers == 2
    assert options.sizes == (2, 1)


def test_copies_its_input():
    cost = np.array([1.0, 2.0])
    options = Options([cost], [[0.0, 1.0]])
    cost[0] = 5
    assert options.costs[0][0] == 1


@pytest.mark.parametrize(
    ("costs", "damages", "message"),
    [
        ([], [], "at least one layer"),
        ([[1]], [[1], [2]], "1 layers but damages has 2"),
        ([[1, 2]], [[1]], "2 costs but 1 damages"),
        ([[1], []], [[1], []], "at least one option"),
        ([[1, np.nan]], [[1, 2]], "NaN or infinite"),
        ([[1, 2]], [[1, np.inf]], "NaN or infinite"),
        ([[1, -2]], [[1, 2]], "negative cost"),
        ([[[1, 2]]], [[[1, 2]]], "must be 1-D"),
        ([["a"]], [[1]], "not a list of numbers"),
    ],
)
def test_invalid_tables_raise_config_error(costs, damages, message):
    with pytest.raises(ConfigError, match=message):
        Options(costs, damages)


def test_totals():
    options = Options([[4, 1, 2], [10, 30]], [[0.0, 3.0, -1.0], [2.0, 0.5]])
    assert options.min_cost() == 11
    assert options.max_cost() == 34
    assert options.min_damage() == -0.5
    assert options.total([2, 1]) == (32.0, -0.5)


def test_totals_do_not_depend_on_layer_order():
    rng = np.random.default_rng(0)
    costs = [rng.uniform(0, 1e9, 3) for _ in range(30)]
    damages = [rng.normal(size=3) * 10.0 ** rng.integers(-8, 8) for _ in range(30)]
    choice = rng.integers(0, 3, 30).tolist()
    order = rng.permutation(30)
    shuffled = Options([costs[i] for i in order], [damages[i] for i in order])
    assert Options(costs, damages).total(choice) == shuffled.total([choice[i] for i in order])


@pytest.mark.parametrize(("choice", "message"), [([0], "got 1 for 2 layers"), ([0, 2], "0..1")])
def test_total_rejects_malformed_choices(choice, message):
    with pytest.raises(PlanError, match=message):
        Options([[1], [1, 2]], [[0], [0, 1]]).total(choice)


def test_nondominated_example():
    cost = np.array([3.0, 1.0, 1.0, 2.0, 2.0, 5.0, 4.0, 2.0])
    damage = np.array([1.0, 4.0, 5.0, 2.0, 2.0, 1.0, 0.0, 3.0])
    # 2 is dominated by 1; 4 duplicates 3; 7 is dominated by 3; 5 is dominated by 0 and 6.
    assert nondominated(cost, damage).tolist() == [1, 3, 0, 6]


def test_nondominated_matches_definition():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        cost = rng.integers(0, 4, n).astype(float)
        damage = rng.integers(0, 4, n).astype(float)
        expected = []
        for j in range(n):
            beaten = any(
                cost[k] <= cost[j]
                and damage[k] <= damage[j]
                and (cost[k] < cost[j] or damage[k] < damage[j] or k < j)
                for k in range(n)
                if k != j
            )
            if not beaten:
                expected.append(j)
        kept = nondominated(cost, damage)
        assert sorted(kept.tolist()) == expected
        for a, b in itertools.pairwise(kept):
            assert cost[a] < cost[b] and damage[a] > damage[b]
