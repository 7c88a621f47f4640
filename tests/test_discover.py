import pytest
import torch
from torch import nn

from allot.discover import LayerSpec, discover
from allot.exceptions import PlanError


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(
            3, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), bias=False
        )
        self.dw = nn.Conv2d(6, 6, 3, groups=6)
        self.circ = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(5, 7)
        self.b.weight = self.a.weight  # tied


def test_discover_finds_supported_layers_and_says_why_others_are_skipped() -> None:
    found = discover(Mixed())
    assert found.names == ["c1", "c2", "a"]
    assert "groups=6" in found.skipped["dw"]
    assert "circular" in found.skipped["circ"]
    assert "tied" in found.skipped["b"] and "a" in found.skipped["b"]


@pytest.mark.parametrize("name", ["c1", "c2", "a"])
def test_spec_replays_the_module_and_round_trips_json(name: str) -> None:
    model = Mixed()
    module = model.get_submodule(name)
    spec = LayerSpec.from_module(module)
    shape = {"c1": (2, 2, 9), "c2": (2, 3, 8, 9), "a": (2, 3, 5)}[name]
    x = torch.randn(shape)
    torch.testing.assert_close(spec.forward(x, module.weight, module.bias), module(x))
    assert LayerSpec.from_json(spec.to_json()) == spec
    assert spec.numel == module.weight.numel()


def test_bad_spec_json_raises_plan_error() -> None:
    with pytest.raises(PlanError, match="layer kind"):
        LayerSpec(kind="lstm", out_features=1, in_features=1)
    with pytest.raises(PlanError, match="missing out_features"):
        LayerSpec.from_json({"kind": "linear"})


CONV_JSON = LayerSpec("conv2d", 8, 4, (3, 3), (1, 1), (1, 1), (1, 1)).to_json()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kernel_size", [3.7, 3], "kernel_size must be 2 ints >= 1"),
        ("kernel_size", [True, 3], "kernel_size must be 2 ints >= 1"),
        ("kernel_size", [3], "kernel_size must be 2 ints >= 1"),
        ("kernel_size", 3, "kernel_size must be a list"),
        ("stride", [0, 1], "stride must be 2 ints >= 1"),
        ("padding", [-1, 0], "padding must be 2 ints >= 0"),
        ("padding", "full", "padding must be a tuple of ints or one of"),
        ("bias", "false", "bias must be true or false"),
        ("bias", 0, "bias must be true or false"),
        ("out_features", 8.0, "out_features must be a positive int"),
        ("in_features", 2**41, "beyond the"),
        ("extra", 1, "unknown field"),
    ],
)
def test_a_spec_from_json_takes_exactly_its_types(field, value, message) -> None:
    """Nonsense is refused, never rounded or coerced (3.7 is no kernel size, "false" no bias)."""
    with pytest.raises(PlanError, match=message):
        LayerSpec.from_json({**CONV_JSON, field: value})


def test_padding_same_needs_stride_one_and_a_convolution() -> None:
    assert LayerSpec("conv1d", 2, 3, (3,), (1,), "same", (2,)).padding == "same"
    with pytest.raises(PlanError, match="needs stride 1"):
        LayerSpec("conv1d", 2, 3, (3,), (2,), "same", (1,))
    with pytest.raises(PlanError, match="for a convolution"):
        LayerSpec("linear", 2, 3, padding="same")


def test_a_subclass_of_linear_is_kept_in_float_with_the_reason() -> None:
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    found = discover(nn.Sequential(Scaled(4, 3), nn.Linear(3, 2)))
    assert found.names == ["1"]
    assert "Scaled subclasses nn.Linear" in found.skipped["0"]
    assert "plain nn.Linear" in found.skipped["0"]
