import copy
import json

import pytest

from allot.budget import Budget
from allot.discover import Discovery, Layer, LayerSpec
from allot.exceptions import PlanError
from allot.plan import LayerPlan, Plan
from allot.schemes import Keep, LowRank, Quant

CONV = LayerSpec("conv2d", 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)
FC = LayerSpec("linear", 10, 32, bias=True)


def _plan() -> Plan:
    return Plan(
        model="test",
        method="uniform-quant",
        error_model="output",
        budget=Budget("ratio", 4.0),
        layers=[LayerPlan("conv", CONV, Quant(4), 0.5), LayerPlan("fc", FC, LowRank(3), None)],
        folded=[("conv", "bn")],
        skipped={"dw": "grouped"},
        metadata={"seed": 0},
    )


def test_json_round_trip_and_cost_is_derived_from_the_scheme() -> None:
    plan = _plan()
    again = Plan.loads(plan.dumps())
    assert again.dumps() == plan.dumps()
    assert again.layers[0].scheme == Quant(4) and again.folded == [("conv", "bn")]
    assert plan.weight_bits == Quant(4).storage_bits(CONV) + LowRank(3).storage_bits(FC)
    assert plan.ratio == pytest.approx(32 * (CONV.numel + FC.numel) / plan.weight_bits)
    assert plan.damage is None  # one layer has no prediction


def test_a_hand_edit_is_costed_from_the_new_scheme() -> None:
    data = _plan().to_json()
    data["layers"][0]["scheme"] = {"kind": "quant", "bits": 2, "group": None}
    data["layers"][0]["cost_bits"] = 1  # stale number in the file is ignored
    edited = Plan.from_json(data)
    assert edited.layers[0].cost_bits == Quant(2).storage_bits(CONV)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("version"), r"plan\.version: missing"),
        (lambda d: d.update(version=99), "reads version 1"),
        (lambda d: d["layers"][0]["scheme"].update(bits=9), r"plan\.layers\[0\]\.scheme.*bits"),
        (
            lambda d: d["layers"][1]["scheme"].update(kind="zip"),
            r"layers\[1\]\.scheme\.kind.*unknown",
        ),
        (lambda d: d["layers"][1]["scheme"].update(rank=99), r"layers\[1\]\.scheme"),
        (lambda d: d["layers"][1]["scheme"].update(rank=0), r"layers\[1\]\.scheme.*>= 1"),
        (
            lambda d: d["layers"][1]["scheme"].update(rank=10**30, fit="whitened"),
            r"layers\[1\]\.scheme.*exceeds the layer's full rank 10",
        ),
        (
            lambda d: d["layers"][1]["scheme"].update(fit="sketchy"),
            r"layers\[1\]\.scheme.*LowRank\.fit",
        ),
        (lambda d: d["layers"][1].update(name="conv"), "appears twice"),
        (lambda d: d["layers"][0].update(damage="big"), r"layers\[0\]\.damage"),
        (lambda d: d.update(budget={"kind": "ratio", "value": -1}), r"plan\.budget"),
        (lambda d: d.update(folded=[["conv"]]), r"plan\.folded"),
        (lambda d: d.update(layers={}), r"plan\.layers: expected list"),
    ],
)
def test_validation_names_the_bad_field(edit, message: str) -> None:
    data = copy.deepcopy(_plan().to_json())
    edit(data)
    with pytest.raises(PlanError, match=message):
        Plan.from_json(json.loads(json.dumps(data)))


def test_invalid_json_text() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.loads("{nope")


def test_check_fits_rejects_a_plan_for_another_model() -> None:
    plan = _plan()
    plan.check_fits(Discovery([Layer("conv", CONV), Layer("fc", FC)]))
    with pytest.raises(PlanError, match="another model"):
        plan.check_fits(Discovery([Layer("conv", CONV)]))
    wider = LayerSpec("linear", 10, 64, bias=True)
    with pytest.raises(PlanError, match=r"layer fc.*another model"):
        plan.check_fits(Discovery([Layer("conv", CONV), Layer("fc", wider)]))
    with pytest.raises(PlanError, match="does not cover"):
        plan.check_fits(Discovery([Layer("conv", CONV), Layer("fc", FC), Layer("x", FC)]))


def test_keep_costs_float32() -> None:
    assert LayerPlan("fc", FC, Keep()).cost_bits == 32 * FC.numel
