"""Grouped: ALDS's layer decomposition, a truncated SVD per group of input channels.

The layer's c input channels are split into k consecutive groups of c / k channels; k must divide
c (as in the paper and its reference code, which pick k among the divisors of c): a grouped
convolution needs equal groups, and zero-padding uneven ones would store or compute zeros. The
folded weight's columns split the same way, W = [W_1 ... W_k], and each W_i (out x c/k * kernel
volume) is replaced by its best rank-j approximation U_i V_i (Eckart-Young), stored as
U_i sqrt(S_i) and sqrt(S_i) V_i' (`GroupedLayer`).

Storage of a layer in bits: 32 * j * (out * k + c * kernel volume). k = 1 is plain `LowRank(j)`.
With `bits`, the factors are stored quantized as `LowRank`'s are (`lowrank.quantize_factors`):
V's rows steered under their group's block of M, U re-solved for them and steered.

Error (ALDS, Theorem 1): the residual is [W_1 - U_1 V_1, ..., W_k - U_k V_k], whose blocks have
operator norms sigma_{j+1}(W_i), so
    max_i sigma_{j+1}(W_i) <= |W_hat - W|_2 <= sqrt(k) max_i sigma_{j+1}(W_i)
(a block row's norm is at least its largest block's and at most sqrt(k) times it). `error_bound`
gives the upper bound relative to |W|_2 = sigma_1(W).

Two fits store exactly the same factors (`fit`):
- `plain`: the above, each group's truncated SVD (ALDS's; needs no data).
- `whitened`: fitted to the damped output error on the calibration inputs,
  E = tr(D (M + lam I) D') with D = W_hat - W, M the layer's input second moment and lam as in
  `LowRank`'s whitened fit. The groups couple through M's off-diagonal blocks, and no closed form
  minimises E over grouped rank-j weights; `GroupedWhitening.fit` descends on it group by group,
  each step exact (the whitened truncation of a shifted target under the group's diagonal block
  of M). k = 1 is `LowRank(j, "whitened")`. The operator-norm bound above is the plain fit's; the
  whitened one has none (it may trade operator-norm error for output error).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.grouped import (
    GroupedBottleneck,
    GroupedLayer,
    QuantizedGroupedLayer,
    grouped_first_spec,
)
from allot.modules.lowrank import second_spec
from allot.profile.activations import damped_cholesky
from allot.profile.cache import Fingerprint
from allot.schemes.base import Scheme, check_int_field, fitted_inputs, register_scheme
from allot.schemes.lowrank import Whitened, quantize_factors, svd_factors
from allot.schemes.quant import MAX_BITS, Quant
from allot.schemes.steer import DAMPING

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile
    from allot.stats import LayerStats

FITS = ("plain", "whitened")
REMEMBERED = 2
"""Grouped whitenings kept in memory, by weight, statistics and group count: scoring fits every
rank of one group count in turn, and they all share the damped moment and its block factors."""
_whitenings: OrderedDict[str, GroupedWhitening] = OrderedDict()
SWEEPS = 10
"""Most sweeps of the whitened fit's block-coordinate descent. Measured on every ResNet-20 layer
at 75% removed (bench/results/mnist-resnet20-grouped-fit.md): the first sweep leaves a median 0.317
of the plain fit's output error, 10 sweeps 0.216, 100 sweeps 0.201."""
TOLERANCE = 1e-3
"""The whitened fit stops once a sweep lowers the output error by less than this share of it."""


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
    """Rank-`rank` fit of each of `groups` input-channel groups, run as a grouped operation then
    a pointwise one; `grouped:3:8` (3 groups, rank 8, each group's plain SVD: ALDS) or
    `grouped:3:8:whitened` (fitted to the layer's calibration inputs, needs its profile);
    `bits` stores the factors quantized (`grouped:3:8:whitened:q4`, as `LowRank`'s)."""

    kind: ClassVar[str] = "grouped"
    groups: int
    rank: int
    fit: str = "plain"
    bits: int | None = None

    def __post_init__(self) -> None:
        check_int_field("Grouped", "groups", self.groups, 1)
        check_int_field("Grouped", "rank", self.rank, 1)
        if self.fit not in FITS:
            raise ConfigError(f"Grouped.fit must be one of {FITS}, got {self.fit!r:.40}")
        if self.bits is not None:
            check_int_field("Grouped", "bits", self.bits, 1, MAX_BITS)

    @property
    def kinds(self) -> str:
        """`grouped` for float factors, `qgrouped` for quantized ones."""
        return "grouped" if self.bits is None else "qgrouped"

    @property
    def family(self) -> int:
        return self.groups

    def label(self) -> str:
        suffix = "-whitened" if self.fit == "whitened" else ""
        bits = "" if self.bits is None else f"-q{self.bits}"
        return f"grouped{self.groups}r{self.rank}{suffix}{bits}"

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
        if self.bits is None:
            return 32 * self.rank * (spec.out_features * self.groups + spec.fan_in)
        quant = Quant(self.bits)
        first, second = self._factor_specs(spec)
        return quant.storage_bits(first) + quant.storage_bits(second)

    def _factor_specs(self, spec: LayerSpec) -> tuple[LayerSpec, LayerSpec]:
        """The quantized factors' layers: the stacked V, then U."""
        width = self.groups * self.rank
        return grouped_first_spec(spec, self.groups, self.rank), second_spec(spec, width)

    def _stored(
        self,
        target: Tensor,
        u: Tensor,
        v: Tensor,
        spec: LayerSpec,
        bias: Tensor | None,
        stats: LayerStats | None,
    ) -> GroupedBottleneck:
        """The fitted float factors as stored: float32, or with `bits` quantized
        (`lowrank.quantize_factors`: steered under `stats`, or rounded to nearest)."""
        if self.bits is None:
            return GroupedLayer.from_factors(spec, u, v, self.groups, bias)
        first, second = quantize_factors(
            fold_weight_2d(target), v, self.groups, self.bits, stats, *self._factor_specs(spec)
        )
        return QuantizedGroupedLayer.from_parts(spec, self.groups, first, second, bias)

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> GroupedBottleneck:
        if self.fit == "plain":
            return self.project(weight, bias, spec)
        return self.refit(
            weight, bias, spec, fitted_inputs(self, profile, "the plain fit (grouped:K:J)")
        )

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> GroupedBottleneck:
        """The plain fit (each group's truncated SVD, the grouped weight nearest to `target` in
        the plain squared error), whichever fit the scheme compresses with: LC's C step
        (quantized factors rounded to nearest, U re-solved in between)."""
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        factors = [svd_factors(block, self.rank) for block in group_blocks(target, self.groups)]
        u = torch.cat([u for u, _ in factors], dim=1)
        v = torch.cat([v for _, v in factors], dim=0)
        return self._stored(target, u, v, spec, bias, None)

    @property
    def refits(self) -> bool:
        """The whitened fit re-fits to new input statistics; the plain fit uses none."""
        return self.fit == "whitened"

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> GroupedBottleneck:
        """The whitened fit of `target` under the input statistics `stats`
        (`GroupedWhitening.fit`; its factors quantized under them, with `bits`)."""
        if not self.refits:
            return super().refit(target, bias, spec, stats)
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        whitening = GroupedWhitening.of(fold_weight_2d(target), stats, self.groups)
        u, v, _ = whitening.fit(self.rank)
        return self._stored(target, u, v, spec, bias, stats)

    def empty(self, spec: LayerSpec) -> GroupedBottleneck:
        self.check(spec)
        if self.bits is None:
            return GroupedLayer(spec, self.groups, self.rank)
        return QuantizedGroupedLayer(spec, self.groups, self.rank, self.bits)

    def error_bound(self, weight: Tensor) -> float | None:
        """ALDS's bound on the relative operator-norm error the plain fit leaves on `weight`:
        sqrt(groups) max_i sigma_{rank+1}(W_i) / sigma_1(W) (0 where every group has rank at most
        `rank`); `ConfigError` for an all-zero weight. None for the whitened fit, which
        minimises the output error on the calibration inputs instead and has no such bound
        (docs/alds.md), and for quantized factors (whose rounding the bound leaves out)."""
        if self.fit != "plain" or self.bits is not None:
            return None
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
        bits = None
        if len(args) > 2 and args[-1].startswith("q"):
            bits = int(args[-1][1:])
            args = args[:-1]
        if len(args) not in (2, 3) or (len(args) == 3 and args[2] not in FITS):
            raise ValueError(
                "expected grouped:GROUPS:RANK[:whitened][:qBITS], e.g. grouped:3:8 or "
                "grouped:3:8:whitened:q4"
            )
        return cls(int(args[0]), int(args[1]), args[2] if len(args) == 3 else "plain", bits)


@dataclasses.dataclass(frozen=True)
class GroupedWhitening:
    """One folded weight split into input-channel groups under one layer's damped input second
    moment M + lam I (float64): the weight, the moment, and the lower Cholesky factor of each
    group's diagonal block M_ii + lam I."""

    weight: Tensor
    moment: Tensor
    choleskys: tuple[Tensor, ...]
    damping: float

    @classmethod
    def of(cls, weight_2d: Tensor, stats: LayerStats, groups: int) -> GroupedWhitening:
        """Damp M by lam = `DAMPING` mean diag M (raised until M + lam I factors, as for
        `LowRank`'s whitened fit) and factor each diagonal block (the last `REMEMBERED` results are
        reused for the same weight, statistics and group count)."""
        key = Fingerprint().tensor(weight_2d).value([stats.samples, groups])
        if stats.input_cov is not None:
            key.tensor(stats.input_cov)
        digest = key.hexdigest()
        if digest in _whitenings:
            _whitenings.move_to_end(digest)
            return _whitenings[digest]
        _, lam = damped_cholesky(stats, DAMPING)
        assert stats.input_cov is not None  # damped_cholesky refuses missing statistics
        second = stats.input_cov.double() / stats.samples
        moment = second + lam * torch.eye(second.shape[0], dtype=second.dtype)
        weight = weight_2d.detach().to(torch.float64)
        width = weight.shape[1] // groups
        choleskys = tuple(
            torch.linalg.cholesky(moment[i * width : (i + 1) * width, i * width : (i + 1) * width])
            for i in range(groups)
        )
        _whitenings[digest] = cls(weight, moment, choleskys, lam)
        while len(_whitenings) > REMEMBERED:
            _whitenings.popitem(last=False)
        return _whitenings[digest]

    @property
    def width(self) -> int:
        return self.weight.shape[1] // len(self.choleskys)

    def output_error(self, product: Tensor) -> float:
        """tr(D (M + lam I) D') for D = `product` - W: the mean squared output error over the
        calibration input rows plus lam |D|^2 (squared output units)."""
        residual = product - self.weight
        return float(((residual @ self.moment) * residual).sum())

    def fit(
        self, rank: int, sweeps: int = SWEEPS, tolerance: float = TOLERANCE
    ) -> tuple[Tensor, Tensor, list[float]]:
        """Factors u (out, k rank) and v (k rank, fan_in / k), float64, and the output error
        (`output_error`) after each sweep of the block-coordinate fit.

        Each group's step is exact: with the other groups' residuals D_l fixed, the error is
        tr((A_i - T_i) M_ii (A_i - T_i)') + const with T_i = W_i - (sum_{l != i} D_l M_li) M_ii^-1,
        minimised over rank-`rank` A_i by the whitened truncation of T_i under M_ii. The first
        sweep starts from the exact weight (every D_l = 0), so each group compensates the error of
        those before it; where the plain fit (each group's SVD, as stored) has the lower error,
        the descent continues from it instead, so the result is never worse than the plain fit.
        Every later sweep can only lower the error. Stops after `sweeps` sweeps or once a sweep
        lowers the error by less than `tolerance` of it. With one group the first sweep is the
        exact optimum (`LowRank`'s whitened fit) and is the only one."""
        k, width = len(self.choleskys), self.width
        factors: list[tuple[Tensor, Tensor]] = []
        residual = torch.zeros_like(self.weight)
        errors: list[float] = []
        for sweep in range(sweeps if k > 1 else 1):
            for i, cholesky in enumerate(self.choleskys):
                cols = slice(i * width, (i + 1) * width)
                others = residual.clone()
                others[:, cols] = 0
                shift = torch.cholesky_solve((others @ self.moment[:, cols]).T, cholesky).T
                target = self.weight[:, cols] - shift
                u, v = Whitened.under(target, cholesky, self.damping).factors(rank)
                factors[i : i + 1] = [(u, v)]  # appends in the first sweep
                residual[:, cols] = u @ v - self.weight[:, cols]
            errors.append(self.output_error(residual + self.weight))
            if sweep == 0 and k > 1:
                fits = (svd_factors(block, rank) for block in self.weight.chunk(k, dim=1))
                plain = [(u.double(), v.double()) for u, v in fits]
                product = torch.cat([u @ v for u, v in plain], dim=1)
                plain_error = self.output_error(product)
                if plain_error < errors[0]:
                    factors, residual, errors[0] = plain, product - self.weight, plain_error
            if len(errors) > 1 and errors[-2] - errors[-1] <= tolerance * errors[-2]:
                break
        return torch.cat([u for u, _ in factors], dim=1), torch.cat([v for _, v in factors]), errors


def _next_singular_value(block: Tensor, rank: int) -> float:
    """sigma_{rank+1} of a matrix: the operator norm of its best rank-`rank` residual."""
    values = torch.linalg.svdvals(block)
    return float(values[rank]) if rank < values.numel() else 0.0
