"""Quant: uniform quantization with per-channel or per-group float16 scales.

Storage of a layer with `n = out * fan_in` weights and `G = out * fan_in / group` groups
(`G = out` without a group size), in bits:
- bits >= 2: 8 * ceil(n * bits / 8) for the packed codes + 16 * G for scales + 16 * G for offsets;
- bits == 1: 8 * ceil(n / 8) + 16 * G (scaled sign: no offset).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.packing import packed_nbytes
from allot.modules.quant import QuantizedLayer, group_count
from allot.schemes.base import Scheme, check_int_field, register_scheme

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile

MAX_BITS = 8


def _to_float16(x: Tensor, toward: float) -> Tensor:
    """`x` rounded to float16 toward `toward` (+inf or -inf), so the result bounds `x`."""
    h = x.to(torch.float16)
    overshoot = h.to(x.dtype) < x if toward > 0 else h.to(x.dtype) > x
    return torch.where(overshoot, torch.nextafter(h, torch.full_like(h, toward)), h)


def quantize_rtn(
    weight_2d: Tensor, bits: int, group: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of a folded (out, fan_in) weight.

    Returns `(codes, scale, offset)`: int64 codes (out, fan_in) in [0, 2**bits - 1], and float16
    `scale`, `offset` of shape (out, n_groups) in the stored form of `QuantizedLayer`.

    bits >= 2: asymmetric min-max grid. The offset is the group minimum rounded down to float16 and
    the scale the step that reaches the group maximum rounded up, so the stored grid covers every
    weight and the error per element is at most scale / 2; codes are chosen against the stored
    float16 values, so the saved layer reproduces them exactly. A constant group gets scale 0.
    bits == 1: scaled sign, scale = mean |w| per group (the least-squares optimal scale for fixed
    signs), sign(0) = +1, offset None.
    """
    out, fan_in = weight_2d.shape
    w = weight_2d.detach().to(torch.float32).reshape(out, group_count(fan_in, group), -1)
    if bits == 1:
        offset = None
        scale = w.abs().mean(-1).to(torch.float16)
        codes = (w >= 0).to(torch.int64)
    else:
        levels = 2**bits - 1
        offset = _to_float16(w.amin(-1), float("-inf"))
        scale = _to_float16((w.amax(-1) - offset.to(torch.float32)) / levels, float("inf"))
        step = scale.to(torch.float32)[..., None]
        varying = step > 0
        q = torch.round((w - offset.to(torch.float32)[..., None]) / torch.where(varying, step, 1.0))
        codes = torch.where(varying, q, 0.0).clamp(0, levels).to(torch.int64)
    finite = torch.isfinite(scale).all() and (offset is None or torch.isfinite(offset).all())
    if not finite:
        raise ConfigError(
            "cannot quantize: the weight has non-finite values or exceeds the float16 range of "
            "the stored scales (|w| up to 65504)"
        )
    return codes.reshape(out, fan_in), scale, offset


@register_scheme
@dataclasses.dataclass(frozen=True)
class Quant(Scheme):
    """`bits`-bit uniform quantization, scales per output channel or per `group` consecutive
    fan-in entries; `quant:4`, `quant:4:g64`."""

    kind: ClassVar[str] = "quant"
    bits: int
    group: int | None = None

    def __post_init__(self) -> None:
        check_int_field("Quant", "bits", self.bits, 1, MAX_BITS)
        if self.group is not None:
            check_int_field("Quant", "group", self.group, 1)

    def label(self) -> str:
        return f"quant{self.bits}" + (f"g{self.group}" if self.group is not None else "")

    def check(self, spec: LayerSpec) -> None:
        group_count(spec.fan_in, self.group)

    def storage_bits(self, spec: LayerSpec) -> int:
        groups = spec.out_features * group_count(spec.fan_in, self.group)
        tables = 1 if self.bits == 1 else 2  # scale, plus offset for bits >= 2
        return 8 * packed_nbytes(spec.numel, self.bits) + 16 * tables * groups

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> QuantizedLayer:
        check_layer_tensors(spec, weight, bias)
        self.check(spec)
        codes, scale, offset = quantize_rtn(fold_weight_2d(weight), self.bits, self.group)
        return QuantizedLayer.from_codes(spec, self.bits, codes, scale, offset, bias)

    def empty(self, spec: LayerSpec) -> QuantizedLayer:
        self.check(spec)
        return QuantizedLayer(spec, self.bits, self.group)

    @classmethod
    def parse_args(cls, args: list[str]) -> Quant:
        if len(args) not in (1, 2) or (len(args) == 2 and not args[1].startswith("g")):
            raise ValueError("expected quant:BITS or quant:BITS:gGROUP, e.g. quant:4:g64")
        return cls(int(args[0]), int(args[1][1:]) if len(args) == 2 else None)
