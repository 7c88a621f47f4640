"""Bit packing: exact byte counts, a pinned bit layout, round trips at every width, errors."""

from __future__ import annotations

import math

import pytest
import torch

from allot.exceptions import ConfigError
from allot.modules.packing import pack, packed_nbytes, unpack

LENGTHS = [0, 1, 7, 8, 9, 13, 100]


def _random_codes(count: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (count,), generator=g, dtype=torch.int64)
    if count >= 2:  # always include both ends of the range
        codes[0], codes[-1] = 0, (1 << bits) - 1
    return codes


@pytest.mark.parametrize("bits", range(1, 33))
def test_round_trip_and_exact_size_at_every_width(bits: int) -> None:
    for count in LENGTHS:
        codes = _random_codes(count, bits, seed=bits * 1000 + count)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
        assert torch.equal(unpack(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 13, 32])
def test_round_trip_of_a_long_tensor(bits: int) -> None:
    codes = _random_codes(100_003, bits, seed=bits)
    assert torch.equal(unpack(pack(codes, bits), bits, 100_003), codes)


def test_bit_layout_is_little_endian_lsb_first() -> None:
    assert pack(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]
    assert pack(torch.tensor([3, 1]), 4).tolist() == [0x13]
    assert pack(torch.tensor([0x1FF]), 9).tolist() == [0xFF, 0x01]
    assert pack(torch.tensor([5, 2, 7]), 3).tolist() == [0b11010101, 0b1]


def test_codes_of_any_shape_are_read_row_major() -> None:
    codes = torch.arange(12).reshape(3, 4) % 8
    assert torch.equal(unpack(pack(codes, 3), 3, 12), codes.reshape(-1))


@pytest.mark.parametrize("bits", [0, 33, -1, True, 4.0])
def test_bad_widths_raise(bits) -> None:
    with pytest.raises(ConfigError, match="bit width"):
        pack(torch.tensor([0]), bits)
    with pytest.raises(ConfigError, match="bit width"):
        packed_nbytes(1, bits)


@pytest.mark.parametrize(
    ("codes", "bits"),
    [(torch.tensor([-1, 0]), 4), (torch.tensor([16]), 4), (torch.tensor([2]), 1)],
)
def test_codes_out_of_range_raise(codes: torch.Tensor, bits: int) -> None:
    with pytest.raises(ConfigError, match="codes must lie in"):
        pack(codes, bits)


def test_non_integer_codes_raise() -> None:
    with pytest.raises(ConfigError, match="integer tensor"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(ConfigError, match="integer tensor"):
        pack(torch.tensor([True]), 1)


def test_unpack_checks_its_input() -> None:
    packed = pack(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ConfigError, match="take 3 bytes, got 2"):
        unpack(packed, 4, 5)
    with pytest.raises(ConfigError, match="1-D uint8"):
        unpack(packed.to(torch.int32), 4, 3)
    with pytest.raises(ConfigError, match="1-D uint8"):
        unpack(packed.reshape(1, 2), 4, 3)
    with pytest.raises(ConfigError, match="non-negative"):
        packed_nbytes(-1, 4)
