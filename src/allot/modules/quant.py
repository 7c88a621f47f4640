"""Quantized layer: bit-packed integer codes on a uniform grid, per output channel or per group.

The weight is folded to 2-D (out, fan_in) and cut into groups of consecutive fan-in entries (one
group per row when no group size is set). A code q of group g of row o, in [0, 2**bits - 1],
dequantizes on one of three grids (`GRIDS`):
- `float-offset`: w = offset[o, g] + scale[o, g] * q, a float16 offset (zero is generally not on
  the grid; allot's grid before integer zero points);
- `zero-point`: w = scale[o, g] * (q - zero[o, g]), an integer zero point in [0, 2**bits - 1], so
  zero is exactly representable (q = zero gives 0.0); ONNX QDQ, torchao and NNCF use this form;
- `symmetric`: w = scale[o, g] * (q - 2**(bits - 1)), a fixed zero point (codes read as signed
  integers -2**(bits-1) .. 2**(bits-1) - 1); zero exactly representable, nothing stored for it.
bits == 1 is the scaled sign w = scale * (2 q - 1) whatever the grid (it is stored as
`symmetric`: no zero, no offset).

Stored tensors: `codes` (uint8, bit-packed row-major), `scale` (float16, (out, n_groups)), and
`offset` (float16, (out, n_groups)) on float-offset grids or `zero` (uint8, the zero points
bit-packed at `bits` bits each, row-major) on zero-point grids. Any algorithm that chooses codes
and a grid can build this layer with `QuantizedLayer.from_codes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.packing import pack, packed_nbytes, unpack

FLOAT_OFFSET = "float-offset"
ZERO_POINT = "zero-point"
SYMMETRIC = "symmetric"
GRIDS = (FLOAT_OFFSET, ZERO_POINT, SYMMETRIC)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def group_count(fan_in: int, group: int | None) -> int:
    """Scale groups per output row (1 without a group size); `ConfigError` when `group` does not
    divide `fan_in`."""
    if group is None:
        return 1
    if fan_in % group != 0:
        works = ", ".join(str(d) for d in _divisors(fan_in))
        raise ConfigError(
            f"Quant.group={group} does not divide the layer's fan_in {fan_in} "
            f"(in_features x kernel volume); group sizes that do: {works}"
        )
    return fan_in // group


def stored_grid(bits: int, grid: str) -> str:
    """The grid a layer of `bits` bits really stores: 1-bit grids are all the scaled sign, which
    is symmetric; `ConfigError` for an unknown grid name."""
    if grid not in GRIDS:
        raise ConfigError(f"Quant.grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    return SYMMETRIC if bits == 1 else grid


@dataclass(frozen=True)
class QuantGrid:
    """A grid's stored tables, each of shape (out, n_groups): float16 `scale`, and the float16
    `offset` (float-offset grids, bits >= 2) or the int64 `zero` point in [0, 2**bits - 1]
    (zero-point grids, bits >= 2); symmetric and 1-bit grids store only the scale."""

    bits: int
    kind: str
    scale: Tensor
    offset: Tensor | None = None
    zero: Tensor | None = None

    def __post_init__(self) -> None:
        if stored_grid(self.bits, self.kind) != self.kind:
            raise ConfigError(f"a {self.bits}-bit grid is stored as {SYMMETRIC}, not {self.kind}")
        wanted = {"offset": self.kind == FLOAT_OFFSET, "zero": self.kind == ZERO_POINT}
        for name, needed in wanted.items():
            if (getattr(self, name) is not None) != needed:
                raise ConfigError(
                    f"a {self.kind} grid {'needs' if needed else 'has no'} {name} table"
                )
        shape = self.scale.shape
        if self.scale.dtype != torch.float16 or self.scale.dim() != 2:
            raise ConfigError(
                f"scale must be a float16 tensor of shape (out, n_groups), got {self.scale.dtype} "
                f"of shape {tuple(shape)}"
            )
        if self.offset is not None and (
            self.offset.dtype != torch.float16 or self.offset.shape != shape
        ):
            raise ConfigError(
                f"offset must be float16 of the scale's shape {tuple(shape)}, got "
                f"{self.offset.dtype} of shape {tuple(self.offset.shape)}"
            )
        if self.zero is not None:
            if self.zero.dtype.is_floating_point or self.zero.shape != shape:
                raise ConfigError(
                    f"zero must be an integer tensor of the scale's shape {tuple(shape)}, got "
                    f"{self.zero.dtype} of shape {tuple(self.zero.shape)}"
                )
            if self.zero.numel() and not (
                int(self.zero.min()) >= 0 and int(self.zero.max()) < 2**self.bits
            ):
                raise ConfigError(f"zero points must lie in [0, {2**self.bits - 1}]")

    def zero_points(self) -> Tensor | None:
        """The integer zero point of every group (int64, (out, n_groups)): stored (zero-point),
        the fixed midpoint 2**(bits-1) (symmetric, bits >= 2), or None (float-offset, 1 bit)."""
        if self.zero is not None:
            return self.zero.to(torch.int64)
        if self.kind == SYMMETRIC and self.bits >= 2:
            return torch.full(
                self.scale.shape, 2 ** (self.bits - 1), dtype=torch.int64, device=self.scale.device
            )
        return None

    def levels(self) -> tuple[Tensor, Tensor]:
        """The grid as (lowest value, step), float64 (out, n_groups): code q stands for
        low + step * q."""
        step = self.scale.double()
        if self.offset is not None:
            return self.offset.double(), step
        zero = self.zero_points()
        if zero is None:  # scaled sign: -s, +s
            return -step, 2 * step
        return -step * zero, step

    def select(self, rows: Tensor, other: QuantGrid) -> QuantGrid:
        """This grid where the boolean `rows` (out,) is false, `other`'s where it is true."""
        pick = rows[:, None]
        return QuantGrid(
            self.bits,
            self.kind,
            torch.where(pick, other.scale, self.scale),
            None if self.offset is None else torch.where(pick, other.offset, self.offset),
            None if self.zero is None else torch.where(pick, other.zero, self.zero),
        )


def dequantize(codes: Tensor, grid: QuantGrid) -> Tensor:
    """Dense float32 (out, fan_in) weight from unpacked codes (out, fan_in) on `grid`. On grids
    with an integer zero point it is computed as scale * (q - zero), so q = zero gives exactly 0."""
    out, fan_in = codes.shape
    q = codes.reshape(out, grid.scale.shape[1], -1)
    s = grid.scale.to(torch.float32)[..., None]
    zero = grid.zero_points()
    if grid.offset is not None:
        w = grid.offset.to(torch.float32)[..., None] + s * q.to(torch.float32)
    elif zero is None:
        w = s * (2 * q - 1).to(torch.float32)
    else:
        w = s * (q - zero[..., None]).to(torch.float32)
    return w.reshape(out, fan_in)


class QuantizedLayer(CompressedLayer):
    """A layer whose weight is stored as `bits`-bit codes on a `grid` (see the module docstring),
    per output channel or per group of `group` consecutive fan-in entries."""

    def __init__(
        self,
        spec: LayerSpec,
        bits: int,
        group: int | None = None,
        bias: Tensor | None = None,
        grid: str = FLOAT_OFFSET,
    ) -> None:
        super().__init__(spec, bias)
        self.bits = bits
        self.group = group
        self.grid = stored_grid(bits, grid)
        groups = group_count(spec.fan_in, group)
        shape = (spec.out_features, groups)
        self.register_buffer(
            "codes", torch.zeros(packed_nbytes(spec.numel, bits), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(shape, dtype=torch.float16))
        offset = torch.zeros(shape, dtype=torch.float16) if self.grid == FLOAT_OFFSET else None
        self.register_buffer("offset", offset)
        zero = (
            torch.zeros(packed_nbytes(spec.out_features * groups, bits), dtype=torch.uint8)
            if self.grid == ZERO_POINT
            else None
        )
        self.register_buffer("zero", zero)

    @classmethod
    def from_codes(
        cls, spec: LayerSpec, codes: Tensor, grid: QuantGrid, bias: Tensor | None = None
    ) -> QuantizedLayer:
        """Build from unpacked integer codes (out, fan_in) in [0, 2**bits) and their `grid`.

        Scales and offsets must already be float16: codes chosen against other values would not
        reproduce.
        """
        if tuple(codes.shape) != (spec.out_features, spec.fan_in):
            raise ConfigError(
                f"codes must have shape (out, fan_in) = {(spec.out_features, spec.fan_in)}, "
                f"got {tuple(codes.shape)}"
            )
        if len(grid.scale) != len(codes):
            raise ConfigError(f"the grid has {len(grid.scale)} rows, the codes {len(codes)}")
        n_groups = grid.scale.shape[1]
        if n_groups < 1 or spec.fan_in % n_groups != 0:
            raise ConfigError(f"{n_groups} scale groups do not divide fan_in {spec.fan_in}")
        group = spec.fan_in // n_groups if n_groups > 1 else None
        layer = cls(spec, grid.bits, group, bias, grid.kind)
        layer.codes = pack(codes, grid.bits)
        layer.scale = stored_copy(grid.scale, torch.float16)
        if grid.offset is not None:
            layer.offset = stored_copy(grid.offset, torch.float16)
        if grid.zero is not None:
            layer.zero = pack(grid.zero, grid.bits)
        return layer

    def unpacked_codes(self) -> Tensor:
        """The integer codes, int64 of shape (out, fan_in)."""
        return unpack(self.codes, self.bits, self.spec.numel).view(
            self.spec.out_features, self.spec.fan_in
        )

    def quant_grid(self) -> QuantGrid:
        """The stored grid (zero points unpacked)."""
        zero = None
        if self.zero is not None:
            zero = unpack(self.zero, self.bits, self.scale.numel()).view(self.scale.shape)
        return QuantGrid(self.bits, self.grid, self.scale, self.offset, zero)

    def weight_parameter_count(self) -> int:
        tables = (self.scale, self.offset)
        return (
            self.spec.numel
            + sum(t.numel() for t in tables if t is not None)
            + (0 if self.zero is None else self.scale.numel())
        )

    def reconstruct(self) -> Tensor:
        w = dequantize(self.unpacked_codes(), self.quant_grid())
        return w.view(self.spec.weight_shape)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group is not None else ""
        return f"{super().extra_repr()}, bits={self.bits}{group}, grid={self.grid}"
