"""Keep: a plain float32 layer with the original geometry, 32 bits per weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.schemes import Keep, parse_scheme


def test_compress_returns_a_plain_layer_with_the_same_geometry():
    spec = LayerSpec("conv2d", 4, 3, (3, 2), (2, 1), (1, 0), (1, 2))
    weight = torch.randn(spec.weight_shape, dtype=torch.float64)
    layer = Keep().compress(weight, torch.zeros(4), spec)
    assert type(layer) is nn.Conv2d
    assert LayerSpec.from_module(layer) == spec
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, weight.float())
    assert type(Keep().empty(LayerSpec("linear", 3, 2, bias=False))) is nn.Linear


def test_storage_is_32_bits_per_weight():
    assert Keep().storage_bits(LayerSpec("conv1d", 4, 3, (5,))) == 32 * 60


def test_takes_no_arguments():
    with pytest.raises(ConfigError):
        parse_scheme("keep:1")
    assert Keep().label() == "keep"
