"""The joint method: its grid per family, tables restricted to one family, plans that meet the
budget and never predict more damage than any one family's, one family alone giving that
family's own plan, and the same plan from the same seed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allot import Budget, compress, score
from allot.allocate import minimize_damage
from allot.api import Refinement, compress_scored
from allot.data import Data, supervised
from allot.discover import Layer, LayerSpec
from allot.evaluate import state_bits
from allot.exceptions import BudgetError, ConfigError, PlanError
from allot.methods import get_method
from allot.methods.cet import steered_grid
from allot.methods.joint import FAMILIES, PER_FAMILY, joint_grid, spread
from allot.modules.base import dense_weight
from allot.policy import Policy
from allot.report.markdown import write_report
from allot.schemes import Keep, LowRank, Quant, Sparse, Sum

ONE_SHOT = Refinement(None)
JOINT = get_method("joint")
CONV = Layer("conv", LayerSpec("conv1d", 32, 32, (3,)))  # fan_in 96, 3072 weights


def test_the_grid_offers_every_family_and_only_schemes_smaller_than_float() -> None:
    grid = joint_grid()(CONV)
    assert grid[-1] == Keep()
    dense = Keep().storage_bits(CONV.spec)
    assert all(s.storage_bits(CONV.spec) < dense for s in grid[:-1])
    kinds = [s.kinds for s in grid[:-1]]
    assert set(kinds) == set(FAMILIES)
    assert kinds == sorted(kinds, key=FAMILIES.index), "families in their order"
    assert len(grid) == len(set(grid)), "no candidate twice"
    for family in ("rank", "qrank", "grouped", "sparse"):
        assert kinds.count(family) <= PER_FAMILY
    assert len(grid) <= 14 + 4 * PER_FAMILY + 3 * 4 + 1


def test_one_family_is_that_familys_candidates_of_the_full_grid() -> None:
    full = joint_grid()(CONV)
    for family in FAMILIES:
        grid = joint_grid([family])(CONV)
        assert grid[-1] == Keep()
        assert {s.kinds for s in grid[:-1]} == {family}
        assert grid[:-1] == [s for s in full if s.kinds == family]
    # The quantized family is CET's steered grid.
    assert joint_grid(["quant"])(CONV) == steered_grid(CONV)


@pytest.mark.parametrize("families", [[], ["quant", "pruning"]])
def test_unknown_or_no_families_are_refused(families: list[str]) -> None:
    with pytest.raises(ConfigError, match="joint families"):
        joint_grid(families)


def test_spread_keeps_both_ends_and_is_even_in_log_storage() -> None:
    spec = CONV.spec
    ranks = [LowRank(r) for r in range(1, 24)]
    picked = spread(ranks, spec, 5)
    assert picked[0] == ranks[0] and picked[-1] == ranks[-1]
    assert [r.rank for r in picked] == sorted(r.rank for r in picked)
    # Storage is proportional to the rank: levels 23 ** (k / 4) = 1, 2.2, 4.8, 10.5, 23: ranks 1, 2, 5, 11 (nearer in log), 23.
    assert [r.rank for r in picked] == [1, 2, 5, 11, 23]
    assert spread(ranks[:4], spec, 5) == ranks[:4]


def tiny() -> nn.Module:
    """A 24-16-6 MLP (fan-ins small enough that steering every candidate takes seconds)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6))


@pytest.fixture(scope="module")
def calibration():
    """Four batches of 16 Gaussian inputs labelled by the model's own prediction (the training
    batches too)."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(64, 24, generator=generator)
    with torch.no_grad():
        labels = tiny()(inputs).argmax(1)
    batches = [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
    return Data(batches, supervised(F.cross_entropy), train=batches)


@pytest.fixture(scope="module")
def scored(calibration):
    return score(tiny(), calibration, JOINT, progress=False)


def _restricted(scored, families):
    method = dataclasses.replace(JOINT, grid=joint_grid(families))
    return dataclasses.replace(scored, method=method, table=scored.table.restricted(method.grid))


def _least_damage(table, max_bits: float) -> float | None:
    """The exact knapsack's least total damage of `table` within `max_bits` (None: out of reach)."""
    options = table.options()
    try:
        choice = minimize_damage(options, max_bits)
    except BudgetError:
        return None
    return options.total(choice)[1]


def test_a_restricted_table_is_the_restricted_grid_scored_again(scored, calibration) -> None:
    # Scoring again with the same seed gives the same candidates, costs and damages to the bit
    # (steered sums included), and restricting the joint table gives the same as scoring the
    # restricted grid.
    method = dataclasses.replace(JOINT, grid=joint_grid(["quant+sparse", "rank", "sparse"]))
    direct = score(tiny(), calibration, method, progress=False).table
    restricted = scored.table.restricted(method.grid)
    for row, direct_row in zip(restricted.candidates, direct.candidates, strict=True):
        assert [(c.scheme, c.cost_bits, c.damage) for c in row] == [
            (c.scheme, c.cost_bits, c.damage) for c in direct_row
        ]


@pytest.mark.parametrize("ratio", [4.0, 8.0, 16.0])
def test_plans_meet_the_budget_and_predict_no_more_damage_than_any_family(scored, ratio) -> None:
    plan = compress_scored(scored, Budget("ratio", ratio), ONE_SHOT).plan
    assert plan.weight_bits <= plan.float_weight_bits / ratio
    total = math.fsum(layer.damage for layer in plan.layers)
    assert total == pytest.approx(_least_damage(scored.table, plan.float_weight_bits / ratio))
    alone = [
        _least_damage(scored.table.restricted(joint_grid([family])), plan.float_weight_bits / ratio)
        for family in FAMILIES
    ]
    reached = [damage for damage in alone if damage is not None]
    assert reached, "some family reaches the ratio alone on this grid"
    assert total <= min(reached) + 1e-12


def test_one_family_alone_gives_that_familys_own_plan(scored, calibration) -> None:
    # joint restricted to quantization is CET's steered grid on the same error model.
    steer = dataclasses.replace(get_method("cet-steer"), error_model="measured")
    own = score(tiny(), calibration, steer, progress=False)
    quant = _restricted(scored, ["quant"])
    for ratio in (4.0, 10.0):
        mine = compress_scored(quant, Budget("ratio", ratio), ONE_SHOT).plan
        theirs = compress_scored(own, Budget("ratio", ratio), ONE_SHOT).plan
        assert [layer.scheme for layer in mine.layers] == [layer.scheme for layer in theirs.layers]
    for family in ("rank", "sparse", "quant+sparse"):
        plan = compress_scored(_restricted(scored, [family]), Budget("ratio", 3.0), ONE_SHOT).plan
        assert {layer.scheme.kinds for layer in plan.layers} <= {family, "keep"}


@pytest.mark.slow
def test_same_seed_same_plan(scored, calibration) -> None:
    again = score(tiny(), calibration, JOINT, progress=False)
    for ratio in (6.0, 12.0):
        first = compress_scored(scored, Budget("ratio", ratio), ONE_SHOT).plan
        second = compress_scored(again, Budget("ratio", ratio), ONE_SHOT).plan
        assert [layer.scheme for layer in first.layers] == [layer.scheme for layer in second.layers]
        assert [layer.damage for layer in first.layers] == [layer.damage for layer in second.layers]


def test_the_report_names_each_layers_family_when_the_plan_mixes_them(scored, tmp_path) -> None:
    plan = compress_scored(scored, Budget("ratio", 8.0), ONE_SHOT).plan
    first, second = plan.layers
    mixed = dataclasses.replace(
        plan,
        layers=[
            dataclasses.replace(first, scheme=Sum((Quant(2, rounding="steered"), Sparse(0.03)))),
            dataclasses.replace(second, scheme=LowRank(1, "whitened")),
        ],
    )
    text = write_report(mixed, {}, tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    assert "| family |" in header
    assert "| quant+sparse |" in text and "| rank |" in text
    one = dataclasses.replace(
        plan, layers=[dataclasses.replace(layer, scheme=Quant(4)) for layer in plan.layers]
    )
    header = next(
        line
        for line in write_report(one, {}, tmp_path / "one").read_text().splitlines()
        if line.startswith("| layer |")
    )
    assert "family" not in header


@pytest.mark.parametrize("refiner", ["feedback", "lc"])
def test_a_mixed_plan_is_refined_by_feedback_and_lc_at_its_storage(calibration, refiner) -> None:
    policy = Policy.parse(pins=["0=quant:2:steered+sparse:0.03", "2=rank:1:whitened"])
    settings = {"steps": 1} if refiner == "lc" else {}
    one_shot = compress(
        tiny(),
        calibration,
        JOINT,
        Budget("ratio", 4.0),
        policy=policy,
        refinement=ONE_SHOT,
        progress=False,
    )
    refined = compress(
        tiny(),
        calibration,
        JOINT,
        Budget("ratio", 4.0),
        policy=policy,
        refinement=Refinement(refiner, settings),
        progress=False,
    )
    assert [layer.scheme.kinds for layer in refined.plan.layers] == ["quant+sparse", "rank"]
    assert refined.plan.weight_bits == one_shot.plan.weight_bits
    assert state_bits(refined.model) == state_bits(one_shot.model)
    # The refiner changed both layers, the sum included.
    for name in ("0", "2"):
        before = dense_weight(one_shot.model.get_submodule(name))
        after = dense_weight(refined.model.get_submodule(name))
        assert not torch.allclose(before, after)


def test_the_plan_says_why_each_layer_got_its_family(scored, tmp_path) -> None:
    plan = compress_scored(scored, Budget("ratio", 8.0), ONE_SHOT).plan
    families = plan.metadata["families"]
    assert set(families) == {layer.name for layer in plan.layers}
    for layer in plan.layers:
        entry = families[layer.name]
        assert set(entry) == set(FAMILIES)
        # The knapsack never takes a dominated candidate: the chosen one is its family's least
        # damaging at its cost.
        own = entry[layer.scheme.kinds]
        assert own == {
            "label": layer.scheme.label(),
            "cost_bits": layer.cost_bits,
            "damage": layer.damage,
        }
        for candidate in entry.values():
            assert candidate is None or candidate["cost_bits"] <= layer.cost_bits
    text = write_report(plan, {}, tmp_path).read_text()
    assert "## Families per layer" in text
    plan.metadata["families"] = {"0": {"quant": {"label": 3, "cost_bits": 1, "damage": 0.0}}}
    with pytest.raises(PlanError, match=r"metadata\.families"):
        write_report(plan, {}, tmp_path / "bad")


def test_a_single_family_plan_has_no_family_table(scored) -> None:
    plan = compress_scored(_restricted(scored, ["quant"]), Budget("ratio", 8.0), ONE_SHOT).plan
    assert "families" not in plan.metadata


def test_screening_scores_only_the_kept_candidates_as_without_it(scored, calibration, tmp_path):
    """A screened joint table holds the candidates `screened` keeps by output error, with the
    damages the unscreened table gives them; the dropped ones are never measured; the plan
    says how many were dropped and the report says it too."""
    margin = 2.0
    screened_scored = score(
        tiny(), calibration, dataclasses.replace(JOINT, screen=margin), progress=False
    )
    table = screened_scored.table
    assert table.screened_out is not None and sum(table.screened_out) > 0
    measured = screened_scored.profile._measured  # one entry per change measured (private)
    full_rows = {
        layer.name: row
        for layer, row in zip(scored.table.layers, scored.table.candidates, strict=True)
    }
    for layer, row, out in zip(table.layers, table.candidates, table.screened_out, strict=True):
        full = full_rows[layer.name]
        assert len(row) + out == len(full)
        damages = {c.scheme: c.damage for c in full}
        assert all(c.damage == damages[c.scheme] for c in row)
        assert Keep() in {c.scheme for c in row}
    assert len(measured) <= sum(len(row) for row in table.candidates)
    plan = compress_scored(screened_scored, Budget("ratio", 8.0), ONE_SHOT).plan
    record = plan.metadata["screened"]
    assert record["margin"] == margin
    assert sum(e["screened_out"] for e in record["layers"].values()) == sum(table.screened_out)
    text = write_report(plan, {}, tmp_path).read_text()
    assert f"Screening: {sum(table.screened_out)} of " in text
    # unscreened tables record nothing
    assert scored.table.screened_out is None
    assert "screened" not in compress_scored(scored, Budget("ratio", 8.0), ONE_SHOT).plan.metadata


def test_a_malformed_screening_record_is_one_plan_error(scored, tmp_path) -> None:
    plan = compress_scored(scored, Budget("ratio", 8.0), ONE_SHOT).plan
    plan.metadata["screened"] = {"margin": 2.0, "layers": {"0": {"screened_out": "many"}}}
    with pytest.raises(PlanError, match="screened"):
        write_report(plan, {}, tmp_path)


def test_a_macs_ratio_limits_the_plans_executed_macs_as_the_report_counts_them(scored) -> None:
    """With a MACs ratio the knapsack also limits the candidates' multiply-accumulates: the plan's
    MACs (as the per-layer report measures them on the compressed model) are what the allocator
    planned and at most the limit, and a tight limit changes the plan."""
    free = compress_scored(scored, Budget("ratio", 4.0), ONE_SHOT).plan
    dense = sum(c["macs"][0] for c in free.metadata["layers"].values())
    executed = sum(c["macs"][1] for c in free.metadata["layers"].values())
    assert "macs" not in free.metadata
    target = 1.05 * dense / executed if executed < dense else 1.2  # tighter than the free plan
    limited = compress_scored(scored, Budget("ratio", 4.0, target), ONE_SHOT).plan
    record = limited.metadata["macs"]
    measured = sum(c["macs"][1] for c in limited.metadata["layers"].values())
    assert record["planned"] == pytest.approx(measured, rel=1e-9)
    assert measured <= record["limit"] * (1 + 1e-9) and record["limit"] == pytest.approx(
        dense / target
    )
    assert measured < executed
    assert [layer.scheme for layer in limited.layers] != [layer.scheme for layer in free.layers]
    assert sum(layer.damage for layer in limited.layers) >= sum(
        layer.damage for layer in free.layers
    )
    with pytest.raises(BudgetError, match=r"MACs ratio 1000000.0 is out of reach .* fewest MACs"):
        compress_scored(scored, Budget("ratio", 4.0, 1e6), ONE_SHOT)


def test_a_macs_ratio_needs_an_allocator_that_can_limit_it(calibration) -> None:
    scored = score(tiny(), calibration, "uniform-quant", progress=False)
    with pytest.raises(ConfigError, match="cannot limit MACs"):
        compress_scored(scored, Budget("ratio", 4.0, 2.0), ONE_SHOT)
