"""LowRank: the folded weight as a product of two float32 factors, fitted by truncated SVD.

Two fits store exactly the same thing (factors U (out, rank) and V (rank, fan_in); a layer of
rank r stores 32 r (out + fan_in) bits):
- `plain`: the truncated SVD of W, the best rank-r approximation in Frobenius norm
  (Eckart-Young); needs no data.
- `whitened`: activation-whitened SVD (SVD-LLM's truncation). With M the layer's mean input
  second moment on the calibration data (`LayerStats`), damped to M + lam I and factored
  S S' = M + lam I (`damped_cholesky`), the SVD of W S = P diag(s) Q' is truncated to r and
  V := sqrt(s_r) Q_r' S^-1, U := P_r sqrt(s_r). Then (W - U V) S = the discarded part of the SVD,
  so the discarded squared singular values are exactly the damped output error
  tr(D (M + lam I) D') = mean over calibration input rows x of |D x|^2 + lam |D|^2, D = U V - W,
  and no rank-r matrix has a smaller one. lam is `DAMPING` times the mean diagonal of M, as in
  steering and error feedback, so a whitened re-fit to feedback's target under the compressed
  model's inputs (`refit`) minimises feedback's objective exactly over all rank-r weights.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.lowrank import LowRankLayer
from allot.profile.activations import damped_cholesky
from allot.profile.cache import Fingerprint
from allot.schemes.base import Scheme, check_int_field, fitted_inputs, register_scheme
from allot.schemes.steer import DAMPING

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile
    from allot.stats import LayerStats

FITS = ("plain", "whitened")
REMEMBERED = 2
"""Whitened SVDs kept in memory, by the content of their weight and statistics: scoring fits
every rank of a layer's grid in turn, and they all truncate the same SVD."""
_whitened: OrderedDict[str, Whitened] = OrderedDict()


def svd_factors(weight_2d: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors in Frobenius norm (Eckart-Young): U_r sqrt(S_r) of shape
    (out, rank) and sqrt(S_r) V_r' of shape (rank, fan_in), float32, computed in float64."""
    u, s, vh = torch.linalg.svd(weight_2d.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.float32), (root[:, None] * vh[:rank]).to(torch.float32)


@dataclasses.dataclass(frozen=True)
class Whitened:
    """The whitened SVD of one folded weight under one layer's input statistics, float64:
    W S = `left` diag(`values`) `right`', S the lower Cholesky factor of M + `damping` I."""

    left: Tensor
    values: Tensor
    right: Tensor
    cholesky: Tensor
    damping: float

    @classmethod
    def of(cls, weight_2d: Tensor, stats: LayerStats) -> Whitened:
        """Factor M + lam I (lam = `DAMPING` mean diag M, raised until it factors) and take the
        SVD of W S (the last `REMEMBERED` results are reused for the same weight and
        statistics)."""
        key = Fingerprint().tensor(weight_2d).value(stats.samples)
        if stats.input_cov is not None:
            key.tensor(stats.input_cov)
        digest = key.hexdigest()
        if digest in _whitened:
            _whitened.move_to_end(digest)
            return _whitened[digest]
        _whitened[digest] = cls._compute(weight_2d, stats)
        while len(_whitened) > REMEMBERED:
            _whitened.popitem(last=False)
        return _whitened[digest]

    @classmethod
    def _compute(cls, weight_2d: Tensor, stats: LayerStats) -> Whitened:
        cholesky, lam = damped_cholesky(stats, DAMPING)
        return cls.under(weight_2d, cholesky, lam)

    @classmethod
    def under(cls, weight_2d: Tensor, cholesky: Tensor, damping: float) -> Whitened:
        """The SVD of W S for a given lower Cholesky factor S (float64) of a damped second
        moment M + `damping` I (`Grouped`'s whitened fit: one per input-channel group)."""
        w = weight_2d.detach().to(torch.float64)
        left, values, right_t = torch.linalg.svd(w @ cholesky, full_matrices=False)
        return cls(left, values, right_t.T, cholesky, damping)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """U = P_r sqrt(s_r) (out, rank) and V = sqrt(s_r) Q_r' S^-1 (rank, fan_in), float64."""
        root = self.values[:rank].sqrt()
        scaled = self.right[:, :rank] * root  # (fan_in, rank) = (sqrt(s_r) Q_r')'
        v_t = torch.linalg.solve_triangular(self.cholesky.T, scaled, upper=True)
        return self.left[:, :rank] * root, v_t.T

    def discarded(self, rank: int) -> float:
        """sum of s_i^2 for i > rank: the damped output error of the rank-`rank` truncation
        (squared output units, mean over input rows)."""
        return float(self.values[rank:].square().sum())


@register_scheme
@dataclasses.dataclass(frozen=True)
class LowRank(Scheme):
    """Rank-`rank` factorisation W ~= U V run as a bottleneck of `rank` channels; `rank:8`
    (plain truncated SVD) or `rank:8:whitened` (activation-whitened SVD, needs the layer's
    profile)."""

    kind: ClassVar[str] = "rank"
    rank: int
    fit: str = "plain"

    def __post_init__(self) -> None:
        check_int_field("LowRank", "rank", self.rank, 1)
        if self.fit not in FITS:
            raise ConfigError(f"LowRank.fit must be one of {FITS}, got {self.fit!r:.40}")

    def label(self) -> str:
        return f"rank{self.rank}" + ("-whitened" if self.fit == "whitened" else "")

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
        if self.fit == "plain":
            return self.project(weight, bias, spec)
        check_layer_tensors(spec, weight, bias)
        self.check(spec)
        return self.refit(
            weight, bias, spec, fitted_inputs(self, profile, "the plain fit (rank:R)")
        )

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> LowRankLayer:
        """LC's C step: the truncated SVD of `target`, the rank-`rank` weight nearest to it in
        the plain squared error, whichever fit (plain or whitened) the scheme compresses with."""
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        u, v = svd_factors(fold_weight_2d(target), self.rank)
        return LowRankLayer.from_factors(spec, u, v, bias)

    @property
    def refits(self) -> bool:
        """The whitened fit re-fits to new input statistics; the plain fit uses none."""
        return self.fit == "whitened"

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> LowRankLayer:
        """The whitened rank-`rank` truncation of `target` under the input statistics `stats`."""
        if not self.refits:
            return super().refit(target, bias, spec, stats)
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        u, v = Whitened.of(fold_weight_2d(target), stats).factors(self.rank)
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
        if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in FITS):
            raise ValueError("expected rank:RANK or rank:RANK:whitened, e.g. rank:8:whitened")
        return cls(int(args[0]), *args[1:])
