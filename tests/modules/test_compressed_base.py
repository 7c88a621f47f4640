"""The compressed-layer base and the helpers shared with plain float layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import (
    CompressedLayer,
    build_float_layer,
    check_layer_tensors,
    dense_weight,
    layer_storage_bits,
)
from allot.schemes import LowRank, Quant, Sparse


class BiasOnly(CompressedLayer):
    """The base's bias handling, with a zero weight (the base itself is abstract)."""

    def reconstruct(self) -> torch.Tensor:
        return torch.zeros(self.spec.weight_shape)

    def weight_parameter_count(self) -> int:
        return 0


def test_float_layers_count_their_weight_at_its_width() -> None:
    assert layer_storage_bits(nn.Linear(5, 3)) == 32 * 15
    assert layer_storage_bits(nn.Conv2d(2, 4, 3, bias=False)) == 32 * 72
    assert layer_storage_bits(nn.Linear(5, 3).half()) == 16 * 15


def test_unknown_modules_are_refused() -> None:
    with pytest.raises(TypeError):
        layer_storage_bits(nn.ReLU())
    with pytest.raises(TypeError):
        dense_weight(nn.ReLU())


def test_build_float_layer_keeps_geometry_and_tensors() -> None:
    spec = LayerSpec("conv1d", 4, 3, (5,), (2,), (1,), (3,))
    weight, bias = torch.randn(spec.weight_shape), torch.randn(4)
    layer = build_float_layer(spec, weight, bias)
    assert type(layer) is nn.Conv1d
    assert LayerSpec.from_module(layer) == spec
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert layer.weight.data_ptr() != weight.data_ptr()
    assert torch.equal(dense_weight(layer), weight)


def test_mismatched_tensors_are_refused() -> None:
    spec = LayerSpec("linear", 3, 5)
    with pytest.raises(ConfigError, match="expects"):
        check_layer_tensors(spec, torch.zeros(5, 3), torch.zeros(3))
    with pytest.raises(ConfigError, match="bias=True"):
        check_layer_tensors(spec, torch.zeros(3, 5), None)
    with pytest.raises(ConfigError, match="bias of shape"):
        check_layer_tensors(spec, torch.zeros(3, 5), torch.zeros(4))
    with pytest.raises(ConfigError, match="bias=False"):
        BiasOnly(LayerSpec("linear", 3, 5, bias=False), torch.zeros(3))


def test_bias_is_a_float32_parameter_named_bias() -> None:
    layer = BiasOnly(LayerSpec("linear", 3, 5), torch.ones(3, dtype=torch.float64))
    assert isinstance(layer.bias, nn.Parameter) and layer.bias.dtype == torch.float32
    assert list(layer.state_dict()) == ["bias"]
    assert layer.storage_bits() == 0
    assert BiasOnly(LayerSpec("linear", 3, 5, bias=False)).bias is None


def test_parameter_counts_and_macs_of_each_compressed_layer() -> None:
    spec = LayerSpec("conv1d", 6, 4, (3,), (1,), (0,), (1,))  # fan_in 12, 72 weights
    weight, bias = torch.randn(spec.weight_shape), torch.randn(6)
    x = torch.randn(2, 4, 10)  # 8 output positions per sample
    quant = Quant(4, 4).compress(weight, bias, spec)
    assert quant.parameter_count() == 72 + 2 * 18 + 6
    assert quant.macs(quant(x)) == 2 * 8 * 6 * 12
    lowrank = LowRank(2).compress(weight, bias, spec)
    assert lowrank.parameter_count() == 2 * (6 + 12) + 6
    assert lowrank.macs(lowrank(x)) == 2 * 8 * 2 * (12 + 6)
    sparse = Sparse(0.25).compress(weight, bias, spec)
    assert sparse.parameter_count() == 18 + 6
