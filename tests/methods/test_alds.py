"""The ALDS methods: their grid, their plans (within budget, deterministic, bounded errors in the
report), the paper's search never beating the exact min-max, and the CLI with its refine flag."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from allot import Budget, apply, compress, load, save, score
from allot.api import Refinement, compress_scored
from allot.cli import main
from allot.discover import Layer, LayerSpec
from allot.io import PLAN
from allot.methods import get_method
from allot.methods.alds import grouped_grid, whitened_grouped_grid
from allot.schemes import Grouped, Keep
from allot.zoo import create_model, get_dataset

ONE_SHOT = Refinement(None)


def test_the_grid_holds_every_divisor_and_rank_that_stores_less_than_float() -> None:
    spec = LayerSpec("conv2d", 8, 6, (3, 3))  # fan_in 54, float 432 weights
    grid = grouped_grid(Layer("conv", spec))
    assert grid[-1] == Keep()
    expected = [
        Grouped(k, j)
        for k in (1, 2, 3, 6)
        for j in range(1, min(8, 54 // k) + 1)
        if j * (8 * k + 54) < 432
    ]
    assert grid[:-1] == expected
    assert {s.groups for s in expected} == {1, 2, 3, 6}


@pytest.fixture(scope="module")
def conv1d():
    return get_dataset("mnist1d", calibration_size=64).to_data()


@pytest.mark.parametrize("method", ["alds", "alds-minmax"])
def test_plans_meet_the_budget_and_the_bound_holds_on_each_layer(conv1d, method: str) -> None:
    scored = score(create_model("test-conv1d"), conv1d, method, progress=False)
    for ratio in (1.5, 2.0, 3.0):
        plan = compress_scored(scored, Budget("ratio", ratio), ONE_SHOT).plan
        assert plan.ratio >= ratio
        errors = plan.metadata["operator_error"]
        assert set(errors) == {layer.name for layer in plan.layers}
        for layer in plan.layers:
            entry = errors[layer.name]
            if layer.scheme == Keep():
                assert entry == {"measured": 0.0, "bound": None}
                continue
            assert entry["measured"] <= entry["bound"] + 1e-5
            assert entry["measured"] == pytest.approx(layer.damage, rel=1e-5, abs=1e-6)


def test_the_papers_search_never_beats_the_exact_minmax(conv1d) -> None:
    scored = score(create_model("test-conv1d"), conv1d, "alds", progress=False)
    exact = get_method("alds-minmax")
    for ratio in (1.5, 2.0, 2.5, 3.0, 4.0):
        budget = Budget("ratio", ratio)
        search = compress_scored(scored, budget, ONE_SHOT).plan
        best = compress_scored(dataclasses.replace(scored, method=exact), budget, ONE_SHOT).plan
        assert max(x.damage for x in search.layers) >= max(x.damage for x in best.layers) - 1e-12


def test_same_seed_same_plan_and_the_artifact_reloads(conv1d, tmp_path) -> None:
    model = create_model("test-conv1d")
    first, again = (
        compress(
            model,
            conv1d,
            "alds",
            Budget("ratio", 2.5),
            refinement=ONE_SHOT,
            model_name="test-conv1d",
            progress=False,
        )
        for _ in range(2)
    )
    assert first.plan.to_json()["layers"] == again.plan.to_json()["layers"]
    assert any(layer.scheme.kind == "grouped" for layer in first.plan.layers)
    out = save(first.model, first.plan, tmp_path / "art")
    loaded, _ = load(out)
    x = get_dataset("mnist1d", calibration_size=64).example_inputs(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), first.model(x))
    rebuilt = apply(create_model("test-conv1d"), first.plan)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), first.model(x), rtol=1e-5, atol=1e-5)


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["--no-progress", *args])
    return code, capsys.readouterr().out


def test_cli_alds_with_and_without_its_refinement(tmp_path, capsys) -> None:
    common = ("compress", "test-conv1d", "--method", "alds", "--ratio", "2", "--calibration", "64")
    code, _ = _run(capsys, *common, "--refine-epochs", "0", "--out", str(tmp_path / "a"))
    assert code == 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| operator error | bound |" in report
    plan = json.loads((tmp_path / "a" / PLAN).read_text())
    assert plan["metadata"]["refine"]["settings"]["epochs"] == 0

    code, _ = _run(capsys, *common, "--refine-epochs", "1", "--out", str(tmp_path / "b"))
    assert code == 0
    refined = json.loads((tmp_path / "b" / PLAN).read_text())
    assert refined["metadata"]["refine"] == {
        "name": "finetune",
        "settings": {**plan["metadata"]["refine"]["settings"], "epochs": 1},
    }
    assert [x["label"] for x in refined["layers"]] == [x["label"] for x in plan["layers"]]


def test_the_whitened_grid_is_the_grid_with_the_whitened_fit() -> None:
    layer = Layer("conv", LayerSpec("conv1d", 8, 4, (3,)))
    assert whitened_grouped_grid(layer) == [
        dataclasses.replace(s, fit="whitened") if isinstance(s, Grouped) else s
        for s in grouped_grid(layer)
    ]


@pytest.mark.slow  # minutes on a shared 2-core machine: one Hessian-vector product a candidate
def test_the_whitened_knapsack_plans_and_reloads(conv1d, tmp_path) -> None:
    """`alds-knapsack-whitened`'s plans meet the budget, are deterministic, hold whitened fits,
    state no operator-norm bound and reload from the artifact."""
    model = create_model("test-conv1d")
    scored = score(
        model, conv1d, "alds-knapsack-whitened", model_name="test-conv1d", progress=False
    )
    first = compress_scored(scored, Budget("ratio", 2.5), ONE_SHOT)
    again = compress_scored(scored, Budget("ratio", 2.5), ONE_SHOT)
    assert first.plan.ratio >= 2.5
    assert first.plan.to_json()["layers"] == again.plan.to_json()["layers"]
    grouped = [x.scheme for x in first.plan.layers if x.scheme.kind == "grouped"]
    assert grouped and all(s.fit == "whitened" for s in grouped)
    assert "operator_error" not in first.plan.metadata
    out = save(first.model, first.plan, tmp_path / "art")
    loaded, _ = load(out)
    x = get_dataset("mnist1d", calibration_size=64).example_inputs(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), first.model(x))
