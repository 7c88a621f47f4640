import itertools

import numpy as np
import pytest

from allot.allocate import Options, minimize_damage, nondominated, screened
from allot.allocate.table import nondominated_by
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


def test_screened_drops_options_beaten_by_more_than_the_margin_at_no_more_cost():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    cheap = np.array([8.0, 1.0, 3.9, 0.5, 0.0])
    # option 2 (cheap 3.9) is beaten by option 1 (1.0) at equal cost: out at margin 2, in at 4;
    # option 0 has nothing cheaper; option 4 (cheap 0) is always kept.
    assert screened(cost, cheap, 2.0).tolist() == [0, 1, 3, 4]
    assert screened(cost, cheap, 4.0).tolist() == [0, 1, 2, 3, 4]
    # margin 1: exactly the options no cheaper-or-equal option beats outright
    assert screened(cost, cheap, 1.0).tolist() == [0, 1, 3, 4]
    assert screened(np.array([1.0, 1.0]), np.array([2.0, 2.0]), 1.0).tolist() == [0, 1]


def test_screening_within_its_margin_never_changes_an_optimum():
    """Exact damages = cheap damages x factors within the margin's ratio: the knapsack's least
    damage is the same with the screened-out options removed, at every budget."""
    dropped = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        margin = float(rng.choice([1.0, 1.5, 4.0]))
        layers = int(rng.integers(2, 4))
        costs = [rng.integers(1, 8, int(rng.integers(2, 7))).astype(float) for _ in range(layers)]
        cheaps = [rng.exponential(size=c.size) * (rng.random(c.size) > 0.1) for c in costs]
        exact = [c * rng.uniform(1.0, margin, c.size) * rng.uniform(0.1, 10) for c in cheaps]
        kept = [screened(c, e, margin) for c, e in zip(costs, cheaps, strict=True)]
        dropped += sum(c.size - k.size for c, k in zip(costs, kept, strict=True))
        full = Options(costs, exact)
        small = Options(
            [c[k] for c, k in zip(costs, kept, strict=True)],
            [e[k] for e, k in zip(exact, kept, strict=True)],
        )
        for budget in np.linspace(full.min_cost(), full.max_cost(), 7):
            best = full.total(minimize_damage(full, budget))[1]
            assert small.total(minimize_damage(small, budget))[1] == pytest.approx(best, abs=1e-9)
    assert dropped > 40  # the property is not vacuous


@pytest.mark.parametrize(
    ("cost", "cheap", "margin", "message"),
    [
        ([1.0, 2.0], [1.0, 2.0], 0.5, "margin"),
        ([1.0, 2.0], [1.0, 2.0], float("inf"), "margin"),
        ([1.0, 2.0], [1.0, 2.0], float("nan"), "margin"),
        ([1.0, 2.0], [1.0, -2.0], 2.0, ">= 0"),
        ([1.0, 2.0], [1.0], 2.0, "one cost"),
    ],
)
def test_screened_rejects_bad_input(cost, cheap, margin, message):
    with pytest.raises(ConfigError, match=message):
        screened(np.array(cost), np.array(cheap), margin)


def test_nondominated_by_matches_the_definition_and_nondominated():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 12))
        values = [rng.integers(0, 4, n).astype(float) for _ in range(3)]
        kept = nondominated_by(values).tolist()
        table = np.stack(values)
        for j in range(n):
            dominated = any(
                np.all(table[:, k] <= table[:, j]) and np.any(table[:, k] < table[:, j])
                for k in range(n)
            )
            first_of_equals = all(not np.array_equal(table[:, k], table[:, j]) for k in range(j))
            assert (j in kept) == (not dominated and first_of_equals)
        cost, damage = values[0], values[1]
        assert (
            sorted(nondominated(cost, damage).tolist()) == nondominated_by((cost, damage)).tolist()
        )
