"""Low-bit CPU kernels for quantized Linear layers: torch's weight-only int4 and int8 matmuls.

- `Int4Kernel`: `torch.ops.aten._weight_int4pack_mm_for_cpu`, the packed 4-bit weight-only matmul
  (torchao's CPU int4 layout runs the same kernel). It computes w = (q - 8) * scale + zero per
  group of 32, 64, 128 or 256 inputs with a float zero, so every affine grid maps onto it exactly
  (w = low + step * q: scale = step, zero = low + 8 step): any quantized layer of 1 to 4 bits,
  whatever its grid. The layout needs a Linear layer with a multiple of 16 outputs, and a group
  size of 32, 64, 128 or 256 (per-channel grids use the largest of those that divides the fan-in,
  each group repeating the channel's scale).
- `Int8Kernel`: `torch.ops.aten._weight_int8pack_mm`, int8 weights times a per-channel scale. A
  5- to 8-bit code q becomes the signed q - 128, so w = scale (q - 128) + c with the per-channel
  c = low + 128 step, and the layer adds c * sum(x) to the kernel's output. The layout needs a
  per-channel grid and a fan-in that is a multiple of 32 (other fan-ins crash the kernel).

Numerics: on CPU both kernels are fast only with bfloat16 activations (their float32 paths are
reference loops, 10-100x slower than a float matmul), so inputs are rounded to bfloat16 and scales
and zeros are held in bfloat16 (8 significant bits): outputs differ from the dequantized float
layer by about 0.2% relative (measured in tests/runtime). The results come back as float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.modules.base import CompressedLayer
from allot.modules.quant import QuantizedLayer
from allot.runtime.runner import Runner

INT4_GROUPS = (256, 128, 64, 32)
INT4_OUT_MULTIPLE = 16
INT8_FAN_IN_MULTIPLE = 32


def int4_group(layer: CompressedLayer) -> int | None:
    """The group size the int4 kernel runs `layer` with, or None when its layout does not allow
    it (see the module docstring)."""
    if not isinstance(layer, QuantizedLayer) or layer.spec.kind != "linear" or layer.bits > 4:
        return None
    if layer.spec.out_features % INT4_OUT_MULTIPLE:
        return None
    if layer.group is not None:
        return layer.group if layer.group in INT4_GROUPS else None
    return next((g for g in INT4_GROUPS if layer.spec.fan_in % g == 0), None)


def int8_fits(layer: CompressedLayer) -> bool:
    """Whether the int8 kernel runs `layer` (a per-channel Linear layer of 5 to 8 bits whose
    fan-in is a multiple of 32)."""
    return (
        isinstance(layer, QuantizedLayer)
        and layer.spec.kind == "linear"
        and 5 <= layer.bits <= 8
        and layer.group is None
        and layer.spec.fan_in % INT8_FAN_IN_MULTIPLE == 0
    )


def _rows(x: Tensor, fan_in: int) -> tuple[Tensor, tuple[int, ...]]:
    """`x` as (rows, fan_in) bfloat16, and its leading shape."""
    return x.reshape(-1, fan_in).to(torch.bfloat16), tuple(x.shape[:-1])


class Int4Kernel(Runner):
    """A 1- to 4-bit Linear layer on torch's packed int4 weight-only kernel."""

    label = "int4 kernel"

    def prepare(self, layer: CompressedLayer) -> None:
        assert isinstance(layer, QuantizedLayer)
        group = int4_group(layer)
        assert group is not None
        middle = 2 ** (layer.bits - 1)
        # codes centred on the kernel's 8, so that w = (q4 - 8) scale + zero with zero the
        # grid's value at its middle code (small: no large zero to round to bfloat16)
        codes = (layer.unpacked_codes() + 8 - middle).to(torch.int32)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.group = group
        low, step = layer.quant_grid().levels()  # (out, n_groups), float64
        self.affine = _Affine.of(low, step, middle)
        if self.affine is not None:  # exact float32 tables applied to the kernel's output
            step, low = torch.ones_like(step), torch.full_like(low, -float(middle))
        repeats = (layer.spec.fan_in // group) // low.shape[1]
        low, step = low.repeat_interleave(repeats, 1), step.repeat_interleave(repeats, 1)
        tables = torch.stack([step.T, (low + middle * step).T], -1)  # (groups, out, 2)
        self.tables = tables.to(torch.bfloat16).contiguous()

    def run(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        rows, lead = _rows(x, layer.spec.fan_in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group, self.tables)
        return _finish(layer, y, rows, self.affine, lead)


class Int8Kernel(Runner):
    """A 5- to 8-bit per-channel Linear layer on torch's int8 weight-only kernel."""

    label = "int8 kernel"

    def prepare(self, layer: CompressedLayer) -> None:
        assert isinstance(layer, QuantizedLayer) and int8_fits(layer)
        middle = 2 ** (layer.bits - 1)
        self.weight = (layer.unpacked_codes() - middle).to(torch.int8).contiguous()
        self.ones = torch.ones(layer.spec.out_features, dtype=torch.bfloat16)
        self.affine = _Affine.of(*layer.quant_grid().levels(), middle)

    def run(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        rows, lead = _rows(x, layer.spec.fan_in)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.ones)
        return _finish(layer, y, rows, self.affine, lead)


class _Affine:
    """A per-channel grid applied to a kernel's integer sums: the kernel computes
    sum x (q - middle) per output, and w = low + step q = step (q - middle) + shift, so the output
    is step * that + shift * sum x, with float32 step and shift (the stored tables exactly)."""

    def __init__(self, step: Tensor, shift: Tensor) -> None:
        self.step, self.shift = step, shift

    @classmethod
    def of(cls, low: Tensor, step: Tensor, middle: int) -> _Affine | None:
        """For a per-channel grid (low, step of shape (out, 1)); None for grouped grids."""
        if low.shape[1] != 1:
            return None
        return cls(step[:, 0].to(torch.float32), (low + middle * step)[:, 0].to(torch.float32))


def _finish(
    layer: CompressedLayer, y: Tensor, rows: Tensor, affine: _Affine | None, lead: tuple[int, ...]
) -> Tensor:
    """The kernel's output `y` as the layer's float32 output: the per-channel grid applied (on
    the same bfloat16 inputs the kernel saw), the bias added, the leading shape restored."""
    y = y.to(torch.float32)
    if affine is not None:
        y = y * affine.step + rows.to(torch.float32).sum(-1, keepdim=True) * affine.shift
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*lead, layer.spec.out_features)


def kernel_for(layer: CompressedLayer) -> Runner | None:
    """A kernel runner for `layer`, or None when no kernel's layout allows it."""
    if int4_group(layer) is not None:
        return Int4Kernel()
    if int8_fits(layer):
        return Int8Kernel()
    return None
