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
    with pytest.raises(PlanError, match="invalid layer spec"):
        LayerSpec.from_json({"kind": "linear"})
