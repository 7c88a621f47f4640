"""Quant: uniform quantization with per-channel or per-group float16 scales.

Storage of a layer with `n = out * fan_in` weights and `G = out * fan_in / group` groups
(`G = out` without a group size), in bits:
- bits >= 2: 8 * ceil(n * bits / 8) for the packed codes + 16 * G for scales + 16 * G for offsets;
- bits == 1: 8 * ceil(n / 8) + 16 * G (scaled sign: no offset).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.packing import packed_nbytes
from allot.modules.quant import QuantizedLayer, group_count
from allot.schemes.base import Scheme, check_int_field, register_scheme
from allot.schemes.grid import quantize_rtn
from allot.schemes.steer import steer

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile
    from allot.stats import LayerStats

MAX_BITS = 8

ROUNDINGS = ("nearest", "steered")


@register_scheme
@dataclasses.dataclass(frozen=True)
class Quant(Scheme):
    """`bits`-bit uniform quantization, scales per output channel or per `group` consecutive
    fan-in entries; `quant:4`, `quant:4:g64`. `rounding="steered"` (`quant:4:steered`) chooses
    clipping and codes to keep the error out of high-curvature directions (`allot.schemes.steer`;
    needs the layer's profile) and stores exactly what round-to-nearest stores."""

    kind: ClassVar[str] = "quant"
    bits: int
    group: int | None = None
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        check_int_field("Quant", "bits", self.bits, 1, MAX_BITS)
        if self.group is not None:
            check_int_field("Quant", "group", self.group, 1)
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"Quant.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    def label(self) -> str:
        group = f"g{self.group}" if self.group is not None else ""
        return f"quant{self.bits}{group}" + ("-steered" if self.rounding == "steered" else "")

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
        if self.rounding == "nearest":
            return self.project(weight, bias, spec)
        if profile is None:
            raise ConfigError(
                f"{self.label()} fits to calibration data: give the layer's profile (allot.api "
                "compress does), or use rounding='nearest'"
            )
        return self.fit_steered(weight, bias, spec, profile.inputs())

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> QuantizedLayer:
        """LC's C step: round-to-nearest on the min-max grid at this scheme's bits and grouping
        (steered or not: steering fits to calibration data, the C step to the weight alone); the
        stored form is the same. 1 bit: the exact least-squares scaled sign per group."""
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        codes, scale, offset = quantize_rtn(fold_weight_2d(target), self.bits, self.group)
        return QuantizedLayer.from_codes(spec, self.bits, codes, scale, offset, bias)

    @property
    def refits(self) -> bool:
        """Steered quantization re-fits its codes and grid to new input statistics."""
        return self.rounding == "steered"

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> QuantizedLayer:
        """Steered codes of `target` under `stats`, the grid re-fitted to them by least squares."""
        if not self.refits:
            return super().refit(target, bias, spec, stats)
        return self.fit_steered(target, bias, spec, stats, refit=True)

    def fit_steered(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        stats: LayerStats,
        refit: bool = False,
    ) -> QuantizedLayer:
        """Steered codes of `weight` under the input second moments `stats` (this scheme's bits
        and grouping, whatever its rounding); `refit` re-fits the grid to the codes (`steer`)."""
        groups = group_count(spec.fan_in, self.group)
        codes, scale, offset = steer(fold_weight_2d(weight), self.bits, groups, stats, refit)
        return QuantizedLayer.from_codes(spec, self.bits, codes, scale, offset, bias)

    def empty(self, spec: LayerSpec) -> QuantizedLayer:
        self.check(spec)
        return QuantizedLayer(spec, self.bits, self.group)

    @classmethod
    def parse_args(cls, args: list[str]) -> Quant:
        usage = "expected quant:BITS[:gGROUP][:steered], e.g. quant:4:g64 or quant:3:steered"
        if not 1 <= len(args) <= 3:
            raise ValueError(usage)
        bits, *rest = args
        rounding = "steered" if rest and rest[-1] == "steered" else "nearest"
        rest = rest[:-1] if rounding == "steered" else rest
        if len(rest) > 1 or (rest and not rest[0].startswith("g")):
            raise ValueError(usage)
        return cls(int(bits), int(rest[0][1:]) if rest else None, rounding)
