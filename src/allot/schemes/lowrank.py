"""LowRank: truncated SVD of the folded weight, stored as two float32 factors.

Storage of a layer in bits: 32 * rank * (out + fan_in).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.lowrank import LowRankLayer
from allot.schemes.base import Scheme, check_int_field, register_scheme

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile


def svd_factors(weight_2d: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors in Frobenius norm (Eckart-Young): U_r sqrt(S_r) of shape
    (out, rank) and sqrt(S_r) V_r' of shape (rank, fan_in), float32, computed in float64."""
    u, s, vh = torch.linalg.svd(weight_2d.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float32), (root[:, None] * vh[:rank]).to(torch.float32)


@register_scheme
@dataclasses.dataclass(frozen=True)
class LowRank(Scheme):
    """Rank-`rank` factorisation W ~= U V run as a bottleneck of `rank` channels; `rank:8`."""

    kind: ClassVar[str] = "rank"
    rank: int

    def __post_init__(self) -> None:
        check_int_field("LowRank", "rank", self.rank, 1)

    def check(self, spec: LayerSpec) -> None:
        full = min(spec.out_features, spec.fan_in)
        if self.rank > full:
            raise ConfigError(
                f"LowRank.rank={self.rank} exceeds the layer's full rank {full} "
                f"(min of out={spec.out_features} and fan_in={spec.fan_in}); use 1..{full}"
            )

    def storage_bits(self, spec: LayerSpec) -> int:
        self.check(spec)
        return 32 * self.rank * (spec.out_features + spec.fan_in)

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> LowRankLayer:
        check_layer_tensors(spec, weight, bias)
        self.check(spec)
        u, v = svd_factors(fold_weight_2d(weight), self.rank)
        return LowRankLayer.from_factors(spec, u, v, bias)

    def select(self, target: Tensor, spec: LayerSpec, price: float) -> LowRank:
        """LC's rank selection: the rank r in 1..min(out, fan_in) minimising
        |target - U V|^2 + price * storage_bits(rank r), with U V the best rank-r factors (the
        error is the sum of the discarded squared singular values; ties go to the lower rank)."""
        check_layer_tensors(spec.with_channels(bias=False), target, None)
        s = torch.linalg.svdvals(fold_weight_2d(target).detach().to(torch.float64))
        discarded = s.pow(2).flip(0).cumsum(0).flip(0)  # discarded[r] = sum_{i >= r} s_i^2
        ranks = range(1, s.numel() + 1)
        errors = [float(discarded[r]) if r < s.numel() else 0.0 for r in ranks]
        objective = [
            e + price * LowRank(r).storage_bits(spec) for e, r in zip(errors, ranks, strict=True)
        ]
        return LowRank(1 + min(range(len(objective)), key=objective.__getitem__))

    def empty(self, spec: LayerSpec) -> LowRankLayer:
        self.check(spec)
        return LowRankLayer(spec, self.rank)

    @classmethod
    def parse_args(cls, args: list[str]) -> LowRank:
        if len(args) != 1:
            raise ValueError("expected rank:RANK, e.g. rank:8")
        return cls(int(args[0]))
