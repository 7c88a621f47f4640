"""Quantized layer: bit-packed integer codes plus float16 scales (and offsets) per group.

The weight is folded to 2-D (out, fan_in) and cut into groups of consecutive fan-in entries (one
group per row when no group size is set). Group g of row o dequantizes as
- bits >= 2: w = offset[o, g] + scale[o, g] * q, q in [0, 2**bits - 1];
- bits == 1: w = scale[o, g] * (2 q - 1), i.e. a scaled sign, q in {0, 1}; no offset is stored.
Stored tensors: `codes` (uint8, packed row-major), `scale` and `offset` (float16, shape
(out, n_groups)). Any algorithm that chooses codes and float16 scales can build this layer with
`QuantizedLayer.from_codes`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.packing import pack, packed_nbytes, unpack


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


def dequantize(codes: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """Dense float32 (out, fan_in) weight from unpacked codes (out, fan_in) and per-group scales
    (out, n_groups); `offset=None` means the 1-bit scaled-sign form."""
    out, fan_in = codes.shape
    q = codes.reshape(out, scale.shape[1], -1).to(torch.float32)
    s = scale.to(torch.float32)[..., None]
    w = s * (2 * q - 1) if offset is None else offset.to(torch.float32)[..., None] + s * q
    return w.reshape(out, fan_in)


class QuantizedLayer(CompressedLayer):
    """A layer whose weight is stored as `bits`-bit codes with float16 scales (and offsets for
    bits >= 2), per output channel or per group of `group` consecutive fan-in entries."""

    def __init__(
        self, spec: LayerSpec, bits: int, group: int | None = None, bias: Tensor | None = None
    ) -> None:
        super().__init__(spec, bias)
        self.bits = bits
        self.group = group
        shape = (spec.out_features, group_count(spec.fan_in, group))
        self.register_buffer(
            "codes", torch.zeros(packed_nbytes(spec.numel, bits), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(shape, dtype=torch.float16))
        offset = torch.zeros(shape, dtype=torch.float16) if bits >= 2 else None
        self.register_buffer("offset", offset)

    @classmethod
    def from_codes(
        cls,
        spec: LayerSpec,
        bits: int,
        codes: Tensor,
        scale: Tensor,
        offset: Tensor | None,
        bias: Tensor | None = None,
    ) -> QuantizedLayer:
        """Build from unpacked integer codes (out, fan_in) in [0, 2**bits), float16 `scale` of shape
        (out, n_groups) and float16 `offset` of the same shape (None exactly when bits == 1).

        Scales must already be float16: codes chosen against other values would not reproduce.
        """
        if tuple(codes.shape) != (spec.out_features, spec.fan_in):
            raise ConfigError(
                f"codes must have shape (out, fan_in) = {(spec.out_features, spec.fan_in)}, "
                f"got {tuple(codes.shape)}"
            )
        if (offset is None) != (bits == 1):
            raise ConfigError("an offset is stored exactly when bits >= 2")
        for name, t in (("scale", scale), ("offset", offset)):
            if t is not None and (t.dtype != torch.float16 or t.dim() != 2 or len(t) != len(codes)):
                raise ConfigError(
                    f"{name} must be a float16 tensor of shape (out, n_groups), got {t.dtype} "
                    f"of shape {tuple(t.shape)}"
                )
        if offset is not None and offset.shape != scale.shape:
            raise ConfigError(f"offset shape {tuple(offset.shape)} != scale {tuple(scale.shape)}")
        n_groups = scale.shape[1]
        if n_groups < 1 or spec.fan_in % n_groups != 0:
            raise ConfigError(f"{n_groups} scale groups do not divide fan_in {spec.fan_in}")
        layer = cls(spec, bits, spec.fan_in // n_groups if n_groups > 1 else None, bias)
        layer.codes = pack(codes, bits)
        layer.scale = stored_copy(scale, torch.float16)
        if offset is not None:
            layer.offset = stored_copy(offset, torch.float16)
        return layer

    def unpacked_codes(self) -> Tensor:
        """The integer codes, int64 of shape (out, fan_in)."""
        return unpack(self.codes, self.bits, self.spec.numel).view(
            self.spec.out_features, self.spec.fan_in
        )

    def weight_parameter_count(self) -> int:
        return self.spec.numel + sum(t.numel() for t in (self.scale, self.offset) if t is not None)

    def reconstruct(self) -> Tensor:
        w = dequantize(self.unpacked_codes(), self.scale, self.offset)
        return w.view(self.spec.weight_shape)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group is not None else ""
        return f"{super().extra_repr()}, bits={self.bits}{group}"
