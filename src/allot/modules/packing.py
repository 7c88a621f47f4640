"""Bit packing of non-negative integer codes into bytes.

Layout: the codes are laid end to end as one little-endian bit stream. Code i occupies stream bits
`i * bits` .. `i * bits + bits - 1`, least significant bit first, and stream bit j is bit `j % 8`
(least significant first) of byte `j // 8`. The last byte is zero-padded. A tensor of n codes of
width `bits` therefore takes exactly `ceil(n * bits / 8)` bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.exceptions import ConfigError

MAX_BITS = 32


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bit width must be an int in 1..{MAX_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes (not bits) that `count` codes of width `bits` occupy when packed."""
    _check_bits(bits)
    if count < 0:
        raise ConfigError(f"code count must be non-negative, got {count}")
    return (count * bits + 7) // 8


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """Eight consecutive codes fill exactly `bits` bytes. For code j of such a group: the first
    byte it touches, its bit offset in that byte, and how many bytes it touches."""
    return [(j * bits // 8, j * bits % 8, (j * bits % 8 + bits + 7) // 8) for j in range(8)]


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor of `packed_nbytes(n, bits)` bytes.

    `codes` may have any shape; it is read in row-major order. The result is on the same device.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ConfigError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    count = flat.numel()
    if count and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ConfigError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
            f"got range [{int(flat.min())}, {int(flat.max())}]"
        )
    groups = -(-count // 8)
    padded = flat.new_zeros(groups * 8)
    padded[:count] = flat
    padded = padded.view(groups, 8)
    packed = flat.new_zeros(groups, bits)
    for j, (first, offset, span) in enumerate(_slots(bits)):
        shifted = padded[:, j] << offset
        for k in range(span):
            packed[:, first + k] |= (shifted >> (8 * k)) & 0xFF
    return packed.reshape(-1)[: packed_nbytes(count, bits)].to(torch.uint8)


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack`: the first `count` codes of width `bits`, as a 1-D int64 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ConfigError(
            f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape "
            f"{tuple(packed.shape)}"
        )
    expected = packed_nbytes(count, bits)
    if packed.numel() != expected:
        raise ConfigError(
            f"{count} codes of {bits} bits take {expected} bytes, got {packed.numel()}"
        )
    groups = -(-count // 8)
    data = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    data[:expected] = packed
    data = data.view(groups, bits)
    codes = torch.empty(groups, 8, dtype=torch.int64, device=packed.device)
    for j, (first, offset, span) in enumerate(_slots(bits)):
        window = data[:, first].clone()
        for k in range(1, span):
            window |= data[:, first + k] << (8 * k)
        codes[:, j] = (window >> offset) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]
