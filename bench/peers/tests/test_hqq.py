"""The HQQ peer on the tiny `test-mlp` (Linear 64->32, Linear 32->10): storage counted from HQQ's
real tensors, weights on HQQ's grid, HQQ's own forward."""

from __future__ import annotations

import pytest
import torch
from peers.base import Setting, packed_bits, tensor_bits
from peers.hqq import PEERS, CastLinear
from torch import nn

from allot.discover import discover
from allot.exceptions import ConfigError

PEER = PEERS[0]
if (REASON := PEER.unavailable()) is not None:
    pytest.skip(REASON, allow_module_level=True)


def run(model: nn.Module, dataset, bits: int, group_size: int):
    setting = Setting(f"{bits}-bit g{group_size}", {"bits": bits, "group_size": group_size})
    return PEER.run(model, dataset, discover(model).layers, setting)


def unpacked_codes(quantized: nn.Module) -> torch.Tensor:
    """HQQ's codes of one layer, unpacked to float32, one row per group."""
    from hqq.core.quantize import Quantizer

    meta = quantized.meta
    codes = Quantizer.unpack[meta["packing"]](quantized.W_q, dtype=torch.float32)
    return codes[: meta["shape"].numel() // meta["group_size"]]


def test_available_and_versioned() -> None:
    assert PEER.unavailable() is None
    assert PEER.version()[0].isdigit()
    labels = [setting.label for setting in PEER.settings()]
    assert len(labels) == 6 == len(set(labels))


def test_stored_bits_are_hqq_tensors(model: nn.Module, dataset) -> None:
    result = run(model, dataset, bits=4, group_size=16)
    assert set(result.stored_bits) == {"1", "3"}
    for name, bits in result.stored_bits.items():
        quantized = result.model.get_submodule(name).quantized
        scale, zero = quantized.meta["scale"], quantized.meta["zero"]
        assert quantized.W_q.dtype == torch.uint8
        assert scale.dtype == zero.dtype == torch.float16
        count = model.get_submodule(name).weight.numel()
        assert scale.numel() == zero.numel() == count // 16
        assert tensor_bits(quantized.W_q) == packed_bits(count, 4)
        assert bits == packed_bits(count, 4) + 2 * 16 * (count // 16)


def test_three_bit_codes_count_their_int32_words(model: nn.Module, dataset) -> None:
    result = run(model, dataset, bits=3, group_size=16)
    quantized = result.model.get_submodule("1").quantized
    rows = 32 * 64 // 16
    assert quantized.W_q.dtype == torch.int32
    assert quantized.W_q.shape == (-(-rows // 10), 16)
    assert result.stored_bits["1"] == 32 * quantized.W_q.numel() + 2 * 16 * rows
    assert result.stored_bits["1"] > packed_bits(32 * 64, 3) + 2 * 16 * rows
    assert any("10 per int32" in note for note in result.notes)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_weights_on_the_grid_and_forward_is_hqqs(model: nn.Module, dataset, bits: int) -> None:
    result = run(model, dataset, bits=bits, group_size=16)
    module = result.model.get_submodule("1")
    assert isinstance(module, CastLinear)
    quantized = module.quantized
    codes = unpacked_codes(quantized)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    meta = quantized.meta
    rebuilt = ((codes.half() - meta["zero"]) * meta["scale"]).reshape(32, 64)
    weight = quantized.dequantize()
    assert torch.equal(rebuilt, weight)
    assert (weight.float() - model.get_submodule("1").weight).abs().max() < 0.5
    x = torch.randn(5, 64)
    expected = (x.half() @ weight.t() + quantized.bias).float()
    out = module(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_fewer_bits_store_fewer_bits(model: nn.Module, dataset) -> None:
    stored = [run(model, dataset, bits, 16).stored_bits["1"] for bits in (8, 4, 3, 2)]
    assert stored == sorted(stored, reverse=True)
    assert len(set(stored)) == 4


def test_group_size_sets_the_number_of_scales(model: nn.Module, dataset) -> None:
    for group_size in (16, 32):
        meta = run(model, dataset, 4, group_size).model.get_submodule("1").quantized.meta
        assert meta["scale"].numel() == meta["zero"].numel() == 32 * 64 // group_size
    assert run(model, dataset, 4, 16).stored_bits["1"] > run(model, dataset, 4, 32).stored_bits["1"]


def test_eight_bits_stay_close_to_float(model: nn.Module, dataset) -> None:
    reference = dataset.task.evaluate(model, dataset, "test")["accuracy"]
    result = run(model, dataset, bits=8, group_size=16)
    assert abs(dataset.task.evaluate(result.model, dataset, "test")["accuracy"] - reference) <= 0.01


def test_layers_the_group_does_not_divide_stay_float(model: nn.Module, dataset) -> None:
    result = run(model, dataset, bits=4, group_size=64)
    assert set(result.stored_bits) == {"1"}
    assert isinstance(result.model.get_submodule("3"), nn.Linear)
    assert any(note.startswith("3: 32 inputs") for note in result.notes)
    assert type(model.get_submodule("1")) is nn.Linear


@pytest.mark.parametrize(
    "options",
    [{"bits": 5, "group_size": 64}, {"bits": 4, "group_size": 12}, {"group_size": 64}],
)
def test_bad_settings_raise_config_errors(model: nn.Module, dataset, options: dict) -> None:
    with pytest.raises(ConfigError):
        PEER.run(model, dataset, discover(model).layers, Setting("bad", options))
