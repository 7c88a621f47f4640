import pytest

from allot.budget import Budget, weight_bits_limit
from allot.exceptions import BudgetError


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("ratio", 0.5, ">= 1"),
        ("ratio", -2, "positive"),
        ("avg_bits", 40, "at most 32"),
        ("bits", 3.5, "whole"),
        ("lossless", 2, "no value"),
        ("size", 1, "unknown budget"),
        ("bytes", "many", "positive"),
        ("ratio", float("inf"), "finite"),
        ("bytes", float("nan"), "finite"),
        ("ratio", True, "positive finite number, got True"),
        ("damage", float("nan"), "finite"),
    ],
)
def test_invalid_budgets_are_refused(kind: str, value, message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        Budget(kind, value)


def test_limits_in_weight_bits() -> None:
    n, other = 1000, 800
    assert weight_bits_limit(Budget("ratio", 8), n, other, None) == 4000
    assert weight_bits_limit(Budget("avg_bits", 3), n, other, None) == 3000
    assert weight_bits_limit(Budget("bytes", 600), n, other, None) == 600 * 8 - 800
    assert weight_bits_limit(Budget("bits", 4), n, other, 4321) == 4321
    with pytest.raises(BudgetError, match="stay float"):
        weight_bits_limit(Budget("bytes", 50), n, other, None)


def test_json_round_trip() -> None:
    for budget in (Budget("ratio", 11.0), Budget("lossless")):
        assert Budget.from_json(budget.to_json()) == budget
    with pytest.raises(BudgetError):
        Budget.from_json({"kind": "ratio"})


def test_a_damage_limit_is_any_finite_number_and_limits_no_size() -> None:
    budget = Budget("damage", -0.5)
    assert not budget.is_size and budget.describe() == "predicted damage <= -0.5"
    assert Budget.from_json(budget.to_json()) == budget
    for bad in (float("nan"), float("inf"), None, "1"):
        with pytest.raises(BudgetError, match="damage limit must be a finite number"):
            Budget("damage", bad)
    with pytest.raises(BudgetError, match="damage budget has no size limit"):
        weight_bits_limit(budget, 10, 0, None)


def test_a_loss_tolerance_is_a_measured_budget() -> None:
    budget = Budget("loss", 0.02)
    assert budget.measured and not budget.is_size and budget.tolerance == 0.02
    assert budget.describe() == "calibration loss <= float + 0.02"
    assert Budget.from_json(budget.to_json()) == budget
    assert Budget("lossless").measured and Budget("lossless").tolerance == 0.0
    assert not Budget("ratio", 2).measured
    for bad in (-0.1, float("nan"), float("inf"), None):
        with pytest.raises(BudgetError, match="loss tolerance must be a finite number >= 0"):
            Budget("loss", bad)


@pytest.mark.parametrize(
    ("kind", "value", "macs", "message"),
    [
        ("ratio", 8, 0.5, ">= 1"),
        ("ratio", 8, float("inf"), ">= 1"),
        ("ratio", 8, True, ">= 1"),
        ("ratio", 8, "2", ">= 1"),
        ("damage", 0.1, 2.0, "beside a size budget"),
        ("lossless", None, 2.0, "beside a size budget"),
    ],
)
def test_invalid_macs_ratios_are_refused(kind, value, macs, message) -> None:
    with pytest.raises(BudgetError, match=message):
        Budget(kind, value, macs)


def test_a_macs_ratio_round_trips_and_older_budgets_still_load() -> None:
    budget = Budget("ratio", 8.0, 2.5)
    assert Budget.from_json(budget.to_json()) == budget
    assert budget.describe() == "ratio 8.0x, MACs / 2.5"
    assert "macs_ratio" not in Budget("ratio", 8.0).to_json()
    assert Budget.from_json({"kind": "ratio", "value": 8.0}) == Budget("ratio", 8.0)
    with pytest.raises(BudgetError, match="'kind', 'value'"):
        Budget.from_json({"kind": "ratio", "value": 8.0, "flops": 2})
