"""Layer cases for the scheme tests: every layer kind, odd fan-ins, stride/padding/dilation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from allot.data import Data, supervised
from allot.discover import LayerSpec, discover
from allot.modules.base import build_float_layer
from allot.profile.engine import LayerProfile, Profile, Settings

# Group size 4 divides every fan-in here (20, 32, 12, 36, 12); only 32 is a multiple of 8.
SPECS = {
    "linear": LayerSpec("linear", 6, 20),
    "linear-nobias": LayerSpec("linear", 16, 32, bias=False),
    "conv1d-strided": LayerSpec("conv1d", 5, 4, (3,), (2,), (1,), (1,)),
    "conv2d-dilated": LayerSpec("conv2d", 7, 4, (3, 3), (2, 1), (1, 2), (2, 1)),
    "conv2d-same": LayerSpec("conv2d", 3, 4, (3, 1), (1, 1), "same", (2, 1), bias=False),
}
_INPUT_POSITIONS = {"linear": (), "conv1d": (11,), "conv2d": (9, 8)}


@dataclass
class LayerCase:
    """A layer spec with a float weight, its bias (or None) and an input batch."""

    spec: LayerSpec
    weight: Tensor
    bias: Tensor | None
    x: Tensor
    seed: int = 0

    @property
    def profile(self) -> LayerProfile:
        """The layer's calibration profile, for schemes that fit to data: the layer alone, on
        its input batch, under the squared distance of its outputs to fixed random targets
        (built once per spec and seed, as the case's tensors are)."""
        key = (self.spec, self.seed)
        if key not in _PROFILES:
            module = build_float_layer(self.spec, self.weight, self.bias)
            with torch.no_grad():
                outputs = module(self.x)
            targets = outputs + torch.randn(
                outputs.shape, generator=torch.Generator().manual_seed(1)
            )
            model = nn.Sequential(module)
            profile = Profile(
                model,
                discover(model).layers,
                Data([(self.x, targets)], supervised(_squared_distance)),
                settings=Settings(probes_min=4, probes_max=4, lanczos_iterations=2),
                progress=False,
            )
            _PROFILES[key] = profile.layer("0")
        return _PROFILES[key]


_PROFILES: dict[tuple[LayerSpec, int], LayerProfile] = {}


def _squared_distance(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).pow(2).sum() / outputs.shape[0]


def make_case(spec: LayerSpec, seed: int = 0) -> LayerCase:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(spec.weight_shape, generator=g) / spec.fan_in**0.5
    bias = torch.randn(spec.out_features, generator=g) if spec.bias else None
    x = torch.randn(3, spec.in_features, *_INPUT_POSITIONS[spec.kind], generator=g)
    return LayerCase(spec, weight, bias, x, seed)


def calibrated_case(spec: LayerSpec, seed: int = 0) -> LayerCase:
    """A layer case with correlated calibration inputs (so whitening matters), with its own
    profile."""
    case = make_case(spec, seed)
    g = torch.Generator().manual_seed(seed + 7)
    mix = torch.randn(spec.in_features, spec.in_features, generator=g)
    x = torch.einsum("ij,bj...->bi...", mix, case.x)
    return LayerCase(spec, case.weight, case.bias, x, seed=1000 + seed)


@pytest.fixture(params=list(SPECS.values()), ids=list(SPECS))
def layer(request: pytest.FixtureRequest) -> LayerCase:
    return make_case(request.param)
