"""Ternary: every weight of output channel o is -a_o, 0 or +a_o (LC's scaled ternary, with one
scale per output channel as `Quant(1)` has).

The fit is exact per channel (closed form): with |w| sorted in decreasing order, keeping the j
largest magnitudes at the best scale leaves the error |w|^2 - (sum_{i<=j} |w|_(i))^2 / j, so
j* = argmax_j (sum_{i<=j} |w|_(i)) / sqrt(j), a = the mean of the j* largest |w|. The scale is
stored as float16 and the codes chosen against the stored value (the nearest of -a, 0, a).

Storage of a layer with n weights, in bits: 8 * ceil(2 n / 8) + 16 * out.
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
from allot.modules.ternary import BITS, TernaryLayer
from allot.schemes.base import Scheme, register_scheme

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile


def ternary_scale(weight_2d: Tensor) -> Tensor:
    """The least-squares scale a of each row of a folded weight for codes in {-1, 0, 1},
    float64 (out,): the mean of the j* largest magnitudes, j* maximising (their sum) / sqrt(j)."""
    magnitudes = weight_2d.detach().to(torch.float64).abs().sort(dim=1, descending=True).values
    sums = magnitudes.cumsum(dim=1)
    counts = torch.arange(1, magnitudes.shape[1] + 1, dtype=torch.float64, device=magnitudes.device)
    best = (sums**2 / counts).argmax(dim=1, keepdim=True)  # the first maximum
    return (sums.gather(1, best) / (best + 1)).squeeze(1)


def ternary_signs(weight_2d: Tensor, scale: Tensor) -> Tensor:
    """The nearest of -a, 0, +a for every weight (int64 in {-1, 0, 1}) given each row's scale."""
    w = weight_2d.detach().to(torch.float64)
    keep = w.abs() > scale.to(torch.float64)[:, None] / 2
    return torch.where(keep, torch.sign(w), 0.0).to(torch.int64)


@register_scheme
@dataclasses.dataclass(frozen=True)
class Ternary(Scheme):
    """Scaled ternary weights, one float16 scale per output channel; `ternary`."""

    kind: ClassVar[str] = "ternary"

    def label(self) -> str:
        return "ternary"

    def storage_bits(self, spec: LayerSpec) -> int:
        return 8 * packed_nbytes(spec.numel, BITS) + 16 * spec.out_features

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> TernaryLayer:
        check_layer_tensors(spec, weight, bias)
        folded = fold_weight_2d(weight)
        scale = ternary_scale(folded).to(torch.float16)
        if not torch.isfinite(scale).all():
            raise ConfigError(
                "cannot fit a ternary scale: the weight has non-finite values or exceeds the "
                "float16 range of the stored scales (|w| up to 65504)"
            )
        return TernaryLayer.from_codes(spec, ternary_signs(folded, scale), scale, bias)

    def empty(self, spec: LayerSpec) -> TernaryLayer:
        return TernaryLayer(spec)

    @classmethod
    def parse_args(cls, args: list[str]) -> Ternary:
        if args:
            raise ValueError("ternary takes no arguments")
        return cls()
