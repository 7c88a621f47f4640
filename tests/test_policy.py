"""Per-layer policy: layers kept in float or pinned to a scheme by name pattern."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from allot import Budget, Policy, compress
from allot.cli import main
from allot.discover import Layer, LayerSpec
from allot.exceptions import ConfigError
from allot.io import PLAN
from allot.policy import Rule
from allot.schemes import Keep, LowRank, Quant
from allot.zoo import create_model

LAYERS = [
    Layer("features.0", LayerSpec("conv2d", 8, 3, (3, 3))),
    Layer("features.3", LayerSpec("conv2d", 8, 8, (3, 3))),
    Layer("head", LayerSpec("linear", 10, 32)),
]


def test_later_rules_override_earlier_ones_for_the_layers_both_match() -> None:
    policy = Policy.parse(keep=["features.*"], pins=["features.3=quant:8", "head=rank:2"])
    assert policy.scheme_for("features.0") == Keep()
    assert policy.scheme_for("features.3") == Quant(8)
    assert policy.scheme_for("head") == LowRank(2)
    grid = policy.grid(lambda layer: [Quant(2), Quant(4)])
    assert grid(LAYERS[0]) == [Keep()] and grid(LAYERS[1]) == [Quant(8)]
    assert Policy().grid(lambda layer: [Quant(2)])(LAYERS[2]) == [Quant(2)]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (Policy((Rule("fc*", Keep()),)), r"'fc\*' matches no compressible layer; the layers are"),
        (Policy((Rule("head", LowRank(11)),)), "cannot apply to layer head"),
    ],
)
def test_rules_that_cannot_hold_are_refused(policy, message) -> None:
    with pytest.raises(ConfigError, match=message):
        policy.check(LAYERS)


@pytest.mark.parametrize("text", ["fc", "=quant:4", "fc=", "fc=quant:99"])
def test_malformed_pins_are_refused(text) -> None:
    with pytest.raises(ConfigError):
        Policy.parse(pins=[text])


def test_kept_layers_are_bit_identical_and_the_budget_still_holds(digits) -> None:
    model = create_model("test-mlp")
    policy = Policy.parse(keep=["3"])
    result = compress(
        model, digits, "output-error-quant", Budget("ratio", 3), policy=policy, progress=False
    )
    kept = result.model.get_submodule("3")
    assert type(kept) is nn.Linear
    assert torch.equal(kept.weight, model.get_submodule("3").weight)
    assert torch.equal(kept.bias, model.get_submodule("3").bias)
    assert result.plan.layer("3").scheme == Keep()
    assert result.plan.ratio >= 3  # the other layer takes up the slack
    assert result.plan.metadata["policy"] == [{"pattern": "3", "scheme": {"kind": "keep"}}]


def test_uniform_methods_move_the_other_layers_together(digits) -> None:
    result = compress(
        create_model("test-mlp"),
        digits,
        "uniform-quant",
        Budget("ratio", 4),
        policy=Policy.parse(pins=["1=quant:8"]),
        progress=False,
    )
    # 64x32 weights at 8 bits leave the 32x10 layer 3 bits within 1/4 of the float size
    assert [layer.scheme for layer in result.plan.layers] == [Quant(8), Quant(3)]


def test_cli_keep_and_pin(tmp_path, capsys) -> None:
    out = tmp_path / "art"
    args = ["--no-progress", "compress", "test-cnn", "--method", "cet", "--ratio", "3"]
    code = main(
        [*args, "--keep", "0", "--pin", "5=quant:6", "--calibration", "64", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / PLAN).read_text())
    schemes = {layer["name"]: layer["label"] for layer in plan["layers"]}
    assert schemes == {"0": "keep", "5": "quant6"}
    code = main([*args, "--keep", "nope", "--out", str(tmp_path / "x")])
    assert code == 2 and "'nope' matches no compressible layer" in capsys.readouterr().err
