"""Quant: uniform quantization with per-channel or per-group float16 scales, on one of three grids.

Storage of a layer with `n = out * fan_in` weights and `G = out * fan_in / group` groups
(`G = out` without a group size), in bits:
- codes: 8 * ceil(n * bits / 8) (bit-packed);
- scales: 16 * G (float16);
- bits >= 2 on a `float-offset` grid: + 16 * G for the float16 offsets;
- bits >= 2 on a `zero-point` grid: + 8 * ceil(G * bits / 8) for the integer zero points,
  bit-packed at `bits` bits each;
- `symmetric` grids and bits == 1 (the scaled sign) store nothing more.
The grids are defined in `allot.modules.quant`, and how they are fitted in `allot.schemes.grid`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.packing import packed_nbytes
from allot.modules.quant import (
    FLOAT_OFFSET,
    GRIDS,
    SYMMETRIC,
    ZERO_POINT,
    QuantizedLayer,
    group_count,
    stored_grid,
)
from allot.schemes.base import Scheme, check_int_field, fitted_inputs, register_scheme
from allot.schemes.grid import quantize_rtn
from allot.schemes.steer import steer, steer_many

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile
    from allot.stats import LayerStats

MAX_BITS = 8

ROUNDINGS = ("nearest", "steered")

DEFAULT_GRID = FLOAT_OFFSET
"""The grid of new `Quant` schemes (and of every method's candidates)."""

LEGACY_GRID = FLOAT_OFFSET
"""The grid of a plan's quant scheme whose JSON has no `grid` field (plans written before grids
were an option): what those plans meant."""

_LABELS = {FLOAT_OFFSET: "offset", ZERO_POINT: "zp", SYMMETRIC: "sym"}


@register_scheme
@dataclasses.dataclass(frozen=True)
class Quant(Scheme):
    """`bits`-bit uniform quantization, scales per output channel or per `group` consecutive
    fan-in entries, on a `grid`: `float-offset`, `zero-point` (integer zero point: zero exactly
    representable) or `symmetric` (see `allot.modules.quant`; 1-bit grids are the scaled sign,
    stored as `symmetric`). String forms `quant:BITS[:gGROUP][:GRID][:steered]`: `quant:4`,
    `quant:4:g64`, `quant:4:zero-point`, `quant:3:g128:symmetric:steered`.
    `rounding="steered"` chooses clipping and codes to keep the error out of high-curvature
    directions (`allot.schemes.steer`; needs the layer's profile) and stores exactly what
    round-to-nearest stores."""

    kind: ClassVar[str] = "quant"
    bits: int
    group: int | None = None
    rounding: str = "nearest"
    grid: str = DEFAULT_GRID

    def __post_init__(self) -> None:
        check_int_field("Quant", "bits", self.bits, 1, MAX_BITS)
        if self.group is not None:
            check_int_field("Quant", "group", self.group, 1)
        if self.rounding not in ROUNDINGS:
            raise ConfigError(
                f"Quant.rounding must be one of {ROUNDINGS}, got {self.rounding!r:.40}"
            )
        object.__setattr__(self, "grid", stored_grid(self.bits, self.grid))

    def label(self) -> str:
        group = f"g{self.group}" if self.group is not None else ""
        grid = "" if self.bits == 1 or self.grid == DEFAULT_GRID else f"-{_LABELS[self.grid]}"
        steered = "-steered" if self.rounding == "steered" else ""
        return f"quant{self.bits}{group}{grid}{steered}"

    def check(self, spec: LayerSpec) -> None:
        group_count(spec.fan_in, self.group)

    def storage_bits(self, spec: LayerSpec) -> int:
        groups = spec.out_features * group_count(spec.fan_in, self.group)
        tables = 16 * groups  # float16 scales
        if self.grid == FLOAT_OFFSET:
            tables += 16 * groups
        elif self.grid == ZERO_POINT:
            tables += 8 * packed_nbytes(groups, self.bits)
        return 8 * packed_nbytes(spec.numel, self.bits) + tables

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
        return self.fit_steered(
            weight, bias, spec, fitted_inputs(self, profile, "rounding='nearest'")
        )

    @classmethod
    def compress_many(
        cls,
        schemes: Sequence[Quant],
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> list[nn.Module]:
        """`compress` of each scheme; the steered ones steered together (`steer_many`: one
        factorisation of the layer's input second moment and one column sweep for all)."""
        steered = [s for s in schemes if s.rounding == "steered"]
        if profile is None or len(steered) < 2:
            return super().compress_many(schemes, weight, bias, spec, profile)
        check_layer_tensors(spec, weight, bias)
        for scheme in steered:
            scheme.check(spec)
        settings = [(s.bits, group_count(spec.fan_in, s.group), s.grid) for s in steered]
        fits = iter(steer_many(fold_weight_2d(weight), settings, profile.inputs()))
        return [
            QuantizedLayer.from_codes(spec, *next(fits), bias)
            if scheme.rounding == "steered"
            else scheme.compress(weight, bias, spec, profile)
            for scheme in schemes
        ]

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> QuantizedLayer:
        """LC's C step: round-to-nearest on this scheme's grid, bits and grouping
        (steered or not: steering fits to calibration data, the C step to the weight alone); the
        stored form is the same. 1 bit: the exact least-squares scaled sign per group."""
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        codes, grid = quantize_rtn(fold_weight_2d(target), self.bits, self.group, self.grid)
        return QuantizedLayer.from_codes(spec, codes, grid, bias)

    @property
    def refits(self) -> bool:
        """Steered quantization re-fits its codes and grid to new input statistics."""
        return self.rounding == "steered"

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> QuantizedLayer:
        """Steered codes of `target` under `stats`, the grid re-fitted to them by least squares
        within its family (`allot.schemes.steer.refit_grid`)."""
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
        """Steered codes of `weight` under the input second moments `stats` (this scheme's bits,
        grouping and grid, whatever its rounding); `refit` re-fits the grid to the codes
        (`steer`)."""
        groups = group_count(spec.fan_in, self.group)
        codes, grid = steer(fold_weight_2d(weight), self.bits, groups, self.grid, stats, refit)
        return QuantizedLayer.from_codes(spec, codes, grid, bias)

    def empty(self, spec: LayerSpec) -> QuantizedLayer:
        self.check(spec)
        return QuantizedLayer(spec, self.bits, self.group, grid=self.grid)

    @classmethod
    def from_params(cls, params: dict[str, Any], where: str, depth: int) -> Scheme:
        """As `Scheme.from_params`; a plan without a `grid` field means `LEGACY_GRID`."""
        return super().from_params({"grid": LEGACY_GRID, **params}, where, depth)

    @classmethod
    def parse_args(cls, args: list[str]) -> Quant:
        usage = (
            "expected quant:BITS[:gGROUP][:GRID][:steered] with GRID one of "
            f"{', '.join(GRIDS)}, e.g. quant:4:g64, quant:4:zero-point or quant:3:steered"
        )
        if not 1 <= len(args) <= 4:
            raise ValueError(usage)
        bits, *rest = args
        rounding = "steered" if rest and rest[-1] == "steered" else "nearest"
        rest = rest[:-1] if rounding == "steered" else rest
        grid = rest.pop() if rest and rest[-1] in GRIDS else DEFAULT_GRID
        if len(rest) > 1 or (rest and not rest[0].startswith("g")):
            raise ValueError(usage)
        return cls(int(bits), int(rest[0][1:]) if rest else None, rounding, grid)
