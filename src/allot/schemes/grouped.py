"""Grouped: ALDS's layer decomposition, a truncated SVD per group of input channels.

The layer's c input channels are split into k consecutive groups of c / k channels; k must divide
c (as in the paper and its reference code, which pick k among the divisors of c): a grouped
convolution needs equal groups, and zero-padding uneven ones would store or compute zeros. The
folded weight's columns split the same way, W = [W_1 ... W_k], and each W_i (out x c/k * kernel
volume) is replaced by its best rank-j approximation U_i V_i (Eckart-Young), stored as
U_i sqrt(S_i) and sqrt(S_i) V_i' (`GroupedLayer`).

Storage of a layer in bits: 32 * j * (out * k + c * kernel volume). k = 1 is plain `LowRank(j)`.

Error (ALDS, Theorem 1): the residual is [W_1 - U_1 V_1, ..., W_k - U_k V_k], whose blocks have
operator norms sigma_{j+1}(W_i), so
    max_i sigma_{j+1}(W_i) <= |W_hat - W|_2 <= sqrt(k) max_i sigma_{j+1}(W_i)
(a block row's norm is at least its largest block's and at most sqrt(k) times it). `error_bound`
gives the upper bound relative to |W|_2 = sigma_1(W).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.grouped import GroupedLayer
from allot.schemes.base import Scheme, check_int_field, register_scheme
from allot.schemes.lowrank import svd_factors

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile


def divisors(n: int) -> list[int]:
    """The positive divisors of `n`, ascending: the group counts a layer with n input channels
    can take."""
    return [k for k in range(1, n + 1) if n % k == 0]


def group_blocks(weight: Tensor, groups: int) -> list[Tensor]:
    """The folded weight's column blocks, one per input channel group, as float64."""
    return list(fold_weight_2d(weight.detach()).double().chunk(groups, dim=1))


@register_scheme
@dataclasses.dataclass(frozen=True)
class Grouped(Scheme):
    """Rank-`rank` SVD of each of `groups` input-channel groups, run as a grouped operation then a
    pointwise one; `grouped:3:8` (3 groups, rank 8)."""

    kind: ClassVar[str] = "grouped"
    groups: int
    rank: int

    def __post_init__(self) -> None:
        check_int_field("Grouped", "groups", self.groups, 1)
        check_int_field("Grouped", "rank", self.rank, 1)

    @property
    def family(self) -> int:
        return self.groups

    def label(self) -> str:
        return f"grouped{self.groups}r{self.rank}"

    def full_rank(self, spec: LayerSpec) -> int:
        """The largest rank of one group's block: min(out, in / groups * kernel volume)."""
        return min(spec.out_features, spec.fan_in // self.groups)

    def check(self, spec: LayerSpec) -> None:
        if spec.in_features % self.groups:
            raise ConfigError(
                f"Grouped.groups={self.groups} does not divide the layer's {spec.in_features} "
                f"input channels; use one of {divisors(spec.in_features)}"
            )
        full = self.full_rank(spec)
        if self.rank > full:
            raise ConfigError(
                f"Grouped.rank={self.rank} exceeds the full rank {full} of each of the "
                f"{self.groups} groups (min of out={spec.out_features} and "
                f"fan_in/groups={spec.fan_in // self.groups}); use 1..{full}"
            )

    def storage_bits(self, spec: LayerSpec) -> int:
        self.check(spec)
        return 32 * self.rank * (spec.out_features * self.groups + spec.fan_in)

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> GroupedLayer:
        check_layer_tensors(spec, weight, bias)
        self.check(spec)
        factors = [svd_factors(block, self.rank) for block in group_blocks(weight, self.groups)]
        u = torch.cat([u for u, _ in factors], dim=1)
        v = torch.cat([v for _, v in factors], dim=0)
        return GroupedLayer.from_factors(spec, u, v, self.groups, bias)

    def empty(self, spec: LayerSpec) -> GroupedLayer:
        self.check(spec)
        return GroupedLayer(spec, self.groups, self.rank)

    def error_bound(self, weight: Tensor) -> float:
        """ALDS's bound on the relative operator-norm error `compress` leaves on `weight`:
        sqrt(groups) max_i sigma_{rank+1}(W_i) / sigma_1(W) (0 where every group has rank at most
        `rank`); `ConfigError` for an all-zero weight."""
        top = float(torch.linalg.matrix_norm(fold_weight_2d(weight.detach()).double(), ord=2))
        if top == 0:
            raise ConfigError("an all-zero weight has no relative error")
        return (
            math.sqrt(self.groups)
            * max(_next_singular_value(b, self.rank) for b in group_blocks(weight, self.groups))
            / top
        )

    @classmethod
    def parse_args(cls, args: list[str]) -> Grouped:
        if len(args) != 2:
            raise ValueError("expected grouped:GROUPS:RANK, e.g. grouped:3:8")
        return cls(int(args[0]), int(args[1]))


def _next_singular_value(block: Tensor, rank: int) -> float:
    """sigma_{rank+1} of a matrix: the operator norm of its best rank-`rank` residual."""
    values = torch.linalg.svdvals(block)
    return float(values[rank]) if rank < values.numel() else 0.0
