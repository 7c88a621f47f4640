import itertools
import math

import numpy as np
import pytest
from scipy.optimize import OptimizeResult

import allot.allocate.knapsack as knapsack
from allot.allocate import Options, minimize_cost, minimize_damage, nondominated
from allot.exceptions import BudgetError, ConfigError

from .cases import KINDS, all_totals, budgets, random_options


def _check_minimize_damage(options, totals, max_cost):
    fitting = [(d, c) for c, d in totals if c <= max_cost]
    if not fitting:
        with pytest.raises(BudgetError):
            minimize_damage(options, max_cost)
        return
    cost, damage = options.total(minimize_damage(options, max_cost))
    assert cost <= max_cost
    assert (damage, cost) == min(fitting), "least damage, then least cost"


def _check_minimize_cost(options, totals, max_damage):
    fitting = [(c, d) for c, d in totals if d <= max_damage]
    if not fitting:
        with pytest.raises(BudgetError):
            minimize_cost(options, max_damage)
        return
    cost, damage = options.total(minimize_cost(options, max_damage))
    assert damage <= max_damage
    assert (cost, damage) == min(fitting), "least cost, then least damage"


@pytest.mark.parametrize("kind", KINDS)
def test_minimize_damage_matches_brute_force(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for _ in range(25):
        options = random_options(rng, kind)
        totals = all_totals(options)
        for max_cost in budgets(totals, 0, 4):
            _check_minimize_damage(options, totals, max_cost)


@pytest.mark.parametrize("kind", KINDS)
def test_minimize_cost_matches_brute_force(kind):
    rng = np.random.default_rng(10 + KINDS.index(kind))
    for _ in range(25):
        options = random_options(rng, kind)
        totals = all_totals(options)
        for max_damage in budgets(totals, 1, 4):
            _check_minimize_cost(options, totals, max_damage)


def test_huge_costs_are_exact_to_the_bit():
    # Layers of 1e8 weights at 1..8 bits plus a few bits of scales: plans that differ by a single
    # bit in 1e9 must be told apart, on both sides of the limit.
    rng = np.random.default_rng(3)
    for _ in range(6):
        params = rng.integers(9 * 10**7, 10**8, 4)
        costs = [np.arange(1, 9) * p + rng.integers(0, 8, 8) for p in params]
        damages = [np.sort(rng.exponential(size=8))[::-1] for _ in params]
        options = Options(costs, damages)
        totals = all_totals(options)
        for cost in [totals[i][0] for i in rng.choice(len(totals), 6)]:
            for max_cost in (cost - 1, cost, cost + 1):
                _check_minimize_damage(options, totals, max_cost)
        for damage in [totals[i][1] for i in rng.choice(len(totals), 6)]:
            _check_minimize_cost(options, totals, damage)


def test_dominated_options_change_nothing():
    rng = np.random.default_rng(4)
    for _ in range(30):
        options = random_options(rng, "float")
        # Add to every layer a copy of each option made worse in cost or damage.
        worse = Options(
            [np.concatenate([c, c + 1, c]) for c in options.costs],
            [np.concatenate([d, d, d + 1]) for d in options.damages],
        )
        totals = all_totals(options)
        for max_cost in budgets(totals, 0, 3):
            if max_cost < options.min_cost():
                continue
            choice = minimize_damage(worse, max_cost)
            assert all(j < n for j, n in zip(choice, options.sizes, strict=True))
            assert worse.total(choice) == options.total(minimize_damage(options, max_cost))
        for max_damage in budgets(totals, 1, 3):
            if max_damage < options.min_damage():
                continue
            choice = minimize_cost(worse, max_damage)
            assert all(j < n for j, n in zip(choice, options.sizes, strict=True))
            assert worse.total(choice) == options.total(minimize_cost(options, max_damage))


def test_never_returns_a_dominated_option():
    rng = np.random.default_rng(5)
    for _ in range(30):
        options = random_options(rng, "duplicates")
        fronts = [
            set(nondominated(c, d).tolist())
            for c, d in zip(options.costs, options.damages, strict=True)
        ]
        for max_cost in budgets(all_totals(options), 0, 3):
            if max_cost < options.min_cost():
                continue
            choice = minimize_damage(options, max_cost)
            assert all(j in front for j, front in zip(choice, fronts, strict=True))


def test_ties_go_to_the_cheaper_choice():
    # Within 5 bits, upgrading either layer removes the same damage; the second is cheaper.
    options = Options([[0, 5], [0, 3]], [[1.0, 0.0], [1.0, 0.0]])
    assert minimize_damage(options, 5) == [0, 1]


def test_cost_ties_go_to_the_less_damaging_choice():
    # Within damage 1.5, upgrading either layer costs the same; the second removes more damage.
    options = Options([[0, 4], [0, 4]], [[1.0, 0.5], [1.0, 0.0]])
    assert minimize_cost(options, 1.5) == [0, 1]


def test_deterministic():
    rng = np.random.default_rng(6)
    costs = [rng.integers(0, 5, 6) for _ in range(12)]  # many ties
    damages = [rng.integers(0, 5, 6).astype(float) for _ in range(12)]
    options = Options(costs, damages)
    budget = options.min_cost() + 0.4 * (options.max_cost() - options.min_cost())
    first = minimize_damage(options, budget)
    assert all(minimize_damage(Options(costs, damages), budget) == first for _ in range(5))
    limit = options.min_damage() + 10
    first = minimize_cost(options, limit)
    assert all(minimize_cost(Options(costs, damages), limit) == first for _ in range(5))


def test_unbounded_limits_take_each_layers_best():
    options = Options([[3, 1, 2], [0, 9]], [[-1.0, 2.0, 0.5], [1.0, 1.0]])
    assert minimize_damage(options, math.inf) == [0, 0]
    assert minimize_cost(options, math.inf) == [1, 0]


def test_single_option_layers():
    options = Options([[7], [2]], [[1.0], [-3.0]])
    assert minimize_damage(options, 9) == [0, 0]
    assert minimize_cost(options, -2.0) == [0, 0]


def test_budget_below_the_smallest_plan_names_it():
    options = Options([[150_000, 200_000], [10, 20]], [[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(BudgetError, match=r"below the smallest plan .*\(150010 bits\).*raise"):
        minimize_damage(options, 120_000)
    with pytest.raises(BudgetError, match="150010 bits"):
        minimize_damage(options, math.nan)


def test_damage_limit_below_the_smallest_reachable_names_it():
    options = Options([[1, 2], [1, 2]], [[1.0, -0.25], [1.0, 0.5]])
    with pytest.raises(BudgetError, match=r"smallest damage reachable .*\(0\.25\).*raise"):
        minimize_cost(options, 0.2)
    with pytest.raises(BudgetError, match=r"\(0\.25\)"):
        minimize_cost(options, math.nan)


def _solver_that_first_returns(choices, options):
    """A stand-in for milp that answers with `choices` (layer option indices) in turn, as if HiGHS
    had accepted each within its tolerance, and then defers to the real solver."""
    answers = list(choices)

    def fake(c, **kwargs):
        if not answers:
            return knapsack_milp(c, **kwargs)
        x = np.concatenate(
            [np.eye(n)[j] for n, j in zip(options.sizes, answers.pop(0), strict=True)]
        )
        return OptimizeResult(status=0, x=x)

    return fake


knapsack_milp = knapsack.milp


def test_a_choice_over_the_limit_is_cut_off_and_solved_again(monkeypatch):
    # Three layers, every option on the Pareto front and fitting on its own; the MILP is needed.
    options = Options([[0, 10, 20], [0, 10, 20], [0, 10, 20]], [[2, 1, 0], [2, 1, 0], [2, 1, 0]])
    over = [[2, 2, 0], [1, 2, 1]]  # 40 bits each: just over a limit of 39 bits
    monkeypatch.setattr(knapsack, "milp", _solver_that_first_returns(over, options))
    choice = minimize_damage(options, 39)
    assert options.total(choice) == (30.0, 3.0)


def test_never_returns_a_choice_over_the_limit(monkeypatch):
    options = Options([[0, 10, 20], [0, 10, 20], [0, 10, 20]], [[2, 1, 0], [2, 1, 0], [2, 1, 0]])
    over = [[2, 2, 0]] * 100
    monkeypatch.setattr(knapsack, "milp", _solver_that_first_returns(over, options))
    with pytest.raises(RuntimeError, match="bug"):
        minimize_damage(options, 39)


def test_dominance_pruning_keeps_the_optimum_of_joint_sized_layers():
    # Layers with as many options as the joint grid offers a small layer, most of them dominated
    # (several families at overlapping costs): the solver, which drops each layer's dominated
    # options before solving, finds the brute-force optimum of the unpruned problem both ways.
    rng = np.random.default_rng(7)
    pruned_away = 0
    for _ in range(8):
        sizes = rng.integers(8, 15, size=3)
        costs = [rng.integers(1, 60, n) * 64 + rng.integers(0, 64, n) for n in sizes]
        damages = [np.exp(-c / 900.0) * rng.uniform(0.5, 4.0, c.size) for c in costs]
        options = Options(costs, damages)
        pruned_away += sum(
            c.size - nondominated(c, d).size for c, d in zip(costs, damages, strict=True)
        )
        totals = all_totals(options)
        for max_cost in budgets(totals, 0, 4):
            _check_minimize_damage(options, totals, max_cost)
        for max_damage in budgets(totals, 1, 4):
            _check_minimize_cost(options, totals, max_damage)
    assert pruned_away > 0, "the instances hold dominated options"


@pytest.mark.parametrize("kind", KINDS)
def test_a_work_limit_too_matches_brute_force(kind):
    """Least damage within a cost and a work limit (then least cost), against every choice."""
    rng = np.random.default_rng(20 + KINDS.index(kind))
    checked = binding = 0
    for _ in range(6):
        plain = random_options(rng, kind)
        work = [rng.integers(0, 9, c.size).astype(float) for c in plain.costs]
        options = Options(plain.costs, plain.damages, work=work)
        choices = list(itertools.product(*(range(n) for n in options.sizes)))
        totals = [
            (*options.total(ch), math.fsum(float(w[j]) for w, j in zip(work, ch, strict=True)))
            for ch in choices
        ]
        for max_cost in budgets([(c, d) for c, d, _ in totals], 0, 2):
            for max_work in sorted({t[2] for t in totals})[::3]:
                fitting = [(d, c) for c, d, w in totals if c <= max_cost and w <= max_work]
                if max_cost < options.min_cost() or not fitting:
                    with pytest.raises(BudgetError):
                        minimize_damage(options, max_cost, max_work)
                    continue
                choice = minimize_damage(options, max_cost, max_work)
                cost, damage = options.total(choice)
                used = math.fsum(float(w[j]) for w, j in zip(work, choice, strict=True))
                assert cost <= max_cost and used <= max_work
                assert (damage, cost) == min(fitting)
                checked += 1
                alone = [(d, c) for c, d, _ in totals if c <= max_cost]
                binding += min(alone) != min(fitting)
    assert checked > 15 and binding > 2  # the work limit decided some of them


def test_a_work_limit_needs_work_and_names_what_cannot_be_met():
    options = Options([[0, 10], [0, 10]], [[2, 0], [2, 0]], work=[[5, 1], [5, 1]])
    with pytest.raises(BudgetError, match="work limit 1 is below"):
        minimize_damage(options, 20, 1)
    # each limit alone can be met, both together cannot: cheap options do more work
    with pytest.raises(BudgetError, match="raise one of the two limits"):
        minimize_damage(options, 5, 6)
    assert minimize_damage(options, 20, 2) == [1, 1]
    with pytest.raises(ConfigError, match="work limit needs"):
        minimize_damage(Options([[0, 1]], [[1, 0]]), 1, 1)
