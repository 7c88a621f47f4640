"""The optimum-quanto peer on the tiny `test-mlp` (Linear 64->32, Linear 32->10): storage counted
from quanto's frozen tensors, weights on quanto's grid, quanto's own forward."""

from __future__ import annotations

import pytest
import torch
from peers.base import Setting, packed_bits, tensor_bits
from peers.quanto import PEERS
from torch import nn

from allot.discover import discover
from allot.exceptions import ConfigError

PEER = PEERS[0]
if (REASON := PEER.unavailable()) is not None:
    pytest.skip(REASON, allow_module_level=True)


def run(model: nn.Module, dataset, weights: str):
    setting = Setting(weights, {"weights": weights})
    return PEER.run(model, dataset, discover(model).layers, setting)


def test_available_and_versioned() -> None:
    assert PEER.unavailable() is None
    assert PEER.version()[0].isdigit()
    assert [setting.label for setting in PEER.settings()] == ["qint8", "qint4", "qint2"]


@pytest.mark.parametrize("weights, bits", [("qint4", 4), ("qint2", 2)])
def test_packed_codes_scale_and_shift(model: nn.Module, dataset, weights: str, bits: int) -> None:
    result = run(model, dataset, weights)
    assert set(result.stored_bits) == {"1", "3"}
    for name, stored in result.stored_bits.items():
        weight = result.model.get_submodule(name).weight
        words = weight._data._data
        assert words.dtype == torch.uint8
        rows, columns = model.get_submodule(name).weight.shape
        per_byte = 8 // bits
        # Codes are packed along the rows, which are padded to a whole number of bytes.
        assert words.shape == (-(-rows // per_byte), columns)
        assert tensor_bits(words) >= packed_bits(rows * columns, bits)
        assert weight._scale.dtype == weight._shift.dtype == torch.float32
        assert stored == tensor_bits(words) + tensor_bits(weight._scale) + tensor_bits(
            weight._shift
        )


def test_int8_codes_and_scale(model: nn.Module, dataset) -> None:
    result = run(model, dataset, "qint8")
    weight = result.model.get_submodule("1").weight
    assert weight._data.dtype == torch.int8
    assert weight._scale.shape == (32, 1)
    assert result.stored_bits["1"] == packed_bits(32 * 64, 8) + tensor_bits(weight._scale)
    rebuilt = weight._data.float() * weight._scale
    torch.testing.assert_close(weight.dequantize(), rebuilt)


@pytest.mark.parametrize("weights, bits", [("qint4", 4), ("qint2", 2)])
def test_weights_on_the_grid_and_forward_is_quantos(
    model: nn.Module, dataset, weights: str, bits: int
) -> None:
    layer = run(model, dataset, weights).model.get_submodule("1")
    weight = layer.weight
    codes = weight._data.unpack()
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    dequantized = weight.dequantize()
    torch.testing.assert_close(dequantized, codes.float() * weight._scale - weight._shift)
    assert (dequantized - model.get_submodule("1").weight).abs().max() < 0.5
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, dequantized, layer.bias))


def test_fewer_bits_store_fewer_bits(model: nn.Module, dataset) -> None:
    stored = [
        run(model, dataset, weights).stored_bits["1"] for weights in ("qint8", "qint4", "qint2")
    ]
    assert stored[0] > stored[1] > stored[2]


def test_quanto_groups_wide_layers_and_not_narrow_ones(model: nn.Module, dataset) -> None:
    narrow = run(model, dataset, "qint4").model.get_submodule("1").weight
    assert narrow._scale.numel() == 32
    wide = nn.Sequential(nn.Linear(256, 8))
    result = run(wide, dataset, "qint4")
    weight = result.model.get_submodule("0").weight
    assert weight._scale.numel() == weight._shift.numel() == 8 * 256 // 128
    assert "128" in result.grid


def test_eight_bits_stay_close_to_float(model: nn.Module, dataset) -> None:
    reference = dataset.task.evaluate(model, dataset, "test")["accuracy"]
    result = run(model, dataset, "qint8")
    assert abs(dataset.task.evaluate(result.model, dataset, "test")["accuracy"] - reference) <= 0.01
    assert type(model.get_submodule("1")) is nn.Linear


def test_bad_setting_raises_config_error(model: nn.Module, dataset) -> None:
    with pytest.raises(ConfigError):
        run(model, dataset, "qfloat8")
