"""The torchao peer on the tiny `test-mlp` (Linear 64->32, Linear 32->10): int8-held codes counted
at their bit-width, weights on torchao's grid, torchao's own forward."""

from __future__ import annotations

import pytest
import torch
from peers.base import Setting, packed_bits, tensor_bits
from peers.torchao import PEERS
from torch import nn

from allot.discover import discover
from allot.exceptions import ConfigError

PEER = PEERS[0]
if (REASON := PEER.unavailable()) is not None:
    pytest.skip(REASON, allow_module_level=True)


def run(model: nn.Module, dataset, bits: int, group_size: int | None, algorithm: str = "affine"):
    options = {"bits": bits, "group_size": group_size, "algorithm": algorithm}
    return PEER.run(model, dataset, discover(model).layers, Setting("test", options))


def test_available_and_versioned() -> None:
    assert PEER.unavailable() is None
    assert PEER.version()[0].isdigit()
    settings = PEER.settings()
    assert len(settings) == 8 == len({setting.label for setting in settings})
    hqq = [setting.options["bits"] for setting in settings if "hqq" in setting.label]
    assert hqq == [4, 3]


@pytest.mark.parametrize("group_size", [16, None])
def test_stored_bits_count_codes_at_their_width(model: nn.Module, dataset, group_size) -> None:
    result = run(model, dataset, bits=3, group_size=group_size)
    assert set(result.stored_bits) == {"1", "3"}
    for name, bits in result.stored_bits.items():
        weight = result.model.get_submodule(name).weight
        assert weight.qdata.dtype == torch.int8
        assert weight.zero_point.dtype == torch.int8
        assert weight.scale.dtype == torch.float32
        assert bits == (
            packed_bits(weight.qdata.numel(), 3)
            + tensor_bits(weight.scale)
            + tensor_bits(weight.zero_point)
        )
        assert bits < tensor_bits(weight.qdata)


@pytest.mark.parametrize("algorithm", ["affine", "hqq_scale_only"])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_weights_on_the_grid_and_forward_is_torchaos(
    model: nn.Module, dataset, bits: int, algorithm: str
) -> None:
    result = run(model, dataset, bits=bits, group_size=16, algorithm=algorithm)
    layer = result.model.get_submodule("1")
    weight = layer.weight
    codes = weight.qdata.to(torch.int32)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(weight.zero_point, torch.zeros_like(weight.zero_point))
    rebuilt = (
        codes - weight.zero_point.repeat_interleave(16, dim=1)
    ) * weight.scale.repeat_interleave(16, dim=1)
    dequantized = weight.dequantize()
    torch.testing.assert_close(dequantized, rebuilt)
    assert (dequantized - model.get_submodule("1").weight).abs().max() < 0.5
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, dequantized, layer.bias))


def test_hqq_scales_differ_from_max_abs_scales(model: nn.Module, dataset) -> None:
    affine = run(model, dataset, 3, 16, "affine").model.get_submodule("1").weight
    hqq = run(model, dataset, 3, 16, "hqq_scale_only").model.get_submodule("1").weight
    assert affine.scale.shape == hqq.scale.shape
    assert not torch.allclose(affine.scale, hqq.scale)
    error = [(w.dequantize() - model.get_submodule("1").weight).pow(2).sum() for w in (affine, hqq)]
    assert error[1] < error[0]


def test_fewer_bits_store_fewer_bits(model: nn.Module, dataset) -> None:
    stored = [run(model, dataset, bits, 16).stored_bits["1"] for bits in (8, 4, 3, 2)]
    assert stored == sorted(stored, reverse=True)
    assert len(set(stored)) == 4


def test_granularity_sets_the_number_of_scales(model: nn.Module, dataset) -> None:
    counts = {}
    for group_size in (16, 32, None):
        weight = run(model, dataset, 4, group_size).model.get_submodule("1").weight
        counts[group_size] = weight.scale.numel()
        assert weight.zero_point.numel() == weight.scale.numel()
    assert counts == {16: 32 * 4, 32: 32 * 2, None: 32}


def test_eight_bits_stay_close_to_float(model: nn.Module, dataset) -> None:
    reference = dataset.task.evaluate(model, dataset, "test")["accuracy"]
    result = run(model, dataset, bits=8, group_size=None)
    assert abs(dataset.task.evaluate(result.model, dataset, "test")["accuracy"] - reference) <= 0.01


def test_layers_the_group_does_not_divide_stay_float(model: nn.Module, dataset) -> None:
    result = run(model, dataset, bits=4, group_size=64)
    assert set(result.stored_bits) == {"1"}
    assert type(result.model.get_submodule("3").weight) is nn.Parameter
    assert type(result.model.get_submodule("3").weight.data) is torch.Tensor
    assert any(note.startswith("3: 32 inputs") for note in result.notes)
    assert type(model.get_submodule("1").weight.data) is torch.Tensor


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 9, "group_size": 64, "algorithm": "affine"},
        {"bits": 4, "group_size": 0, "algorithm": "affine"},
        {"bits": 4, "group_size": 64, "algorithm": "gptq"},
        {"group_size": 64, "algorithm": "affine"},
    ],
)
def test_bad_settings_raise_config_errors(model: nn.Module, dataset, options: dict) -> None:
    with pytest.raises(ConfigError):
        PEER.run(model, dataset, discover(model).layers, Setting("bad", options))
