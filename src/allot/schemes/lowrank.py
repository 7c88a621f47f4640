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

With `bits`, the factors are stored quantized (`QuantizedLowRankLayer`: each factor `bits`-bit
codes on the default grid with per-row float16 tables, as `Quant(bits)` stores a layer), so a
layer of rank r stores Quant(bits)'s bits of a (r, fan_in) and of an (out, r) weight: about
`bits / 32` of the float factors, for r times `32 / bits` more rank at the same size. Fitted in
three steps from the float factors U V of the fit above:
1. V quantized row by row: steered under the layer's input second moment M (whitened fit; a
   grouped fit's rows under their group's diagonal block of M; round-to-nearest for the plain fit
   and LC's C step);
2. U re-solved for the quantized V^ (block-diagonal for a grouped fit): the least-squares
   U = W A V^' (V^ A V^')^-1, with A = M + lam I (whitened) or I (plain), minimises the fit's own
   error tr(D A D') over U;
3. U quantized: steered under the second moment V^ M V^' of the bottleneck's channels (the
   inputs U sees), or round-to-nearest.
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
from allot.modules.lowrank import (
    Bottleneck,
    LowRankLayer,
    QuantizedLowRankLayer,
    first_spec,
    second_spec,
)
from allot.modules.quant import QuantGrid, QuantizedLayer, dequantize, stored_grid
from allot.profile.activations import damped_cholesky
from allot.profile.cache import Fingerprint
from allot.schemes.base import Scheme, check_int_field, fitted_inputs, register_scheme
from allot.schemes.grid import quantize_rtn
from allot.schemes.quant import DEFAULT_GRID, MAX_BITS, Quant
from allot.schemes.steer import DAMPING, steer
from allot.stats import LayerStats

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile

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
    profile); `bits` stores the factors quantized (`rank:32:whitened:q4`)."""

    kind: ClassVar[str] = "rank"
    rank: int
    fit: str = "plain"
    bits: int | None = None

    def __post_init__(self) -> None:
        check_int_field("LowRank", "rank", self.rank, 1)
        if self.fit not in FITS:
            raise ConfigError(f"LowRank.fit must be one of {FITS}, got {self.fit!r:.40}")
        if self.bits is not None:
            check_int_field("LowRank", "bits", self.bits, 1, MAX_BITS)

    def label(self) -> str:
        fit = "-whitened" if self.fit == "whitened" else ""
        bits = "" if self.bits is None else f"-q{self.bits}"
        return f"rank{self.rank}{fit}{bits}"

    @property
    def kinds(self) -> str:
        """`rank` for float factors, `qrank` for quantized ones."""
        return "rank" if self.bits is None else "qrank"

    def check(self, spec: LayerSpec) -> None:
        full = min(spec.out_features, spec.fan_in)
        if self.rank > full:
            raise ConfigError(
                f"LowRank.rank={self.rank} exceeds the layer's full rank {full} "
                f"(min of out={spec.out_features} and fan_in={spec.fan_in}); use 1..{full}"
            )

    def storage_bits(self, spec: LayerSpec) -> int:
        self.check(spec)
        if self.bits is None:
            return 32 * self.rank * (spec.out_features + spec.fan_in)
        quant = Quant(self.bits)
        return quant.storage_bits(first_spec(spec, self.rank)) + quant.storage_bits(
            second_spec(spec, self.rank)
        )

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> Bottleneck:
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
    ) -> Bottleneck:
        """LC's C step: the truncated SVD of `target`, the rank-`rank` weight nearest to it in
        the plain squared error, whichever fit (plain or whitened) the scheme compresses with;
        quantized factors rounded to nearest, U re-solved for the rounded V in between."""
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        w = fold_weight_2d(target)
        u, v = svd_factors(w, self.rank)
        if self.bits is None:
            return LowRankLayer.from_factors(spec, u, v, bias)
        return self._quantized(w, v, spec, bias, None)

    @property
    def refits(self) -> bool:
        """The whitened fit re-fits to new input statistics; the plain fit uses none."""
        return self.fit == "whitened"

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> Bottleneck:
        """The whitened rank-`rank` truncation of `target` under the input statistics `stats`
        (its factors quantized under them, with `bits`)."""
        if not self.refits:
            return super().refit(target, bias, spec, stats)
        check_layer_tensors(spec, target, bias)
        self.check(spec)
        w = fold_weight_2d(target)
        u, v = Whitened.of(w, stats).factors(self.rank)
        if self.bits is None:
            return LowRankLayer.from_factors(spec, u, v, bias)
        return self._quantized(w, v, spec, bias, stats)

    def _quantized(
        self,
        weight_2d: Tensor,
        v: Tensor,
        spec: LayerSpec,
        bias: Tensor | None,
        stats: LayerStats | None,
    ) -> QuantizedLowRankLayer:
        assert self.bits is not None
        first, second = quantize_factors(
            weight_2d,
            v,
            1,
            self.bits,
            stats,
            first_spec(spec, self.rank),
            second_spec(spec, self.rank),
        )
        return QuantizedLowRankLayer.from_parts(spec, first, second, bias)

    def select(self, target: Tensor, spec: LayerSpec, price: float) -> LowRank:
        """LC's rank selection: the rank r in 1..min(out, fan_in) minimising
        |target - U V|^2 + price * storage_bits(rank r), with U V the best rank-r factors (the
        error is the sum of the discarded squared singular values, of the float factors also
        for quantized ones; ties go to the lower rank). The fit and bits stay this scheme's."""
        check_layer_tensors(spec.with_channels(bias=False), target, None)
        s = torch.linalg.svdvals(fold_weight_2d(target).detach().to(torch.float64))
        discarded = s.pow(2).flip(0).cumsum(0).flip(0)  # discarded[r] = sum_{i >= r} s_i^2
        members = [dataclasses.replace(self, rank=r) for r in range(1, s.numel() + 1)]
        errors = [float(discarded[m.rank]) if m.rank < s.numel() else 0.0 for m in members]
        objective = [e + price * m.storage_bits(spec) for e, m in zip(errors, members, strict=True)]
        return members[min(range(len(objective)), key=objective.__getitem__)]

    def empty(self, spec: LayerSpec) -> Bottleneck:
        self.check(spec)
        if self.bits is None:
            return LowRankLayer(spec, self.rank)
        return QuantizedLowRankLayer(spec, self.rank, self.bits)

    @classmethod
    def parse_args(cls, args: list[str]) -> LowRank:
        usage = "expected rank:RANK[:whitened][:qBITS], e.g. rank:8:whitened or rank:32:q4"
        bits = None
        if len(args) > 1 and args[-1].startswith("q"):
            bits = int(args[-1][1:])
            args = args[:-1]
        if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in FITS):
            raise ValueError(usage)
        return cls(int(args[0]), args[1] if len(args) == 2 else "plain", bits)


def least_squares_left(weight_2d: Tensor, v: Tensor, moment: Tensor) -> Tensor:
    """The U (out, rank) minimising tr((W - U V) A (W - U V)') for a positive definite A
    (`moment`, (fan_in, fan_in)): U = W A V' (V A V')^-1, float64 (a V of dependent rows gets
    the least-norm solution)."""
    av = moment @ v.T  # (fan_in, rank)
    gram = v @ av  # (rank, rank)
    return torch.linalg.lstsq(gram, (weight_2d @ av).T).solution.T


def quantize_factors(
    weight_2d: Tensor,
    v: Tensor,
    groups: int,
    bits: int,
    stats: LayerStats | None,
    first: LayerSpec,
    second: LayerSpec,
) -> tuple[QuantizedLayer, QuantizedLayer]:
    """The quantized factors of a (grouped) low-rank fit, by the module docstring's three steps:
    `v` (groups * rank, fan_in / groups: each group's rows read that group's consecutive input
    columns) quantized row by row as `first`, U (out, groups * rank) re-solved for it and
    quantized as `second`. With `stats`, both steered (each group's rows of V under its diagonal
    block of M, U under the moment of the bottleneck's channels) and U solved under M + lam I;
    without, rounded to nearest and U solved in the plain norm."""
    kind = stored_grid(bits, DEFAULT_GRID)
    v = v.detach().double()
    width = v.shape[1]
    if stats is None:
        codes, grid = quantize_rtn(v, bits, None, kind)
    else:
        assert stats.input_cov is not None
        blocks = []
        for i, rows in enumerate(v.chunk(groups)):
            cols = slice(i * width, (i + 1) * width)
            block = LayerStats(stats.input_cov[cols, cols], stats.samples)
            blocks.append(steer(rows, bits, 1, kind, block))
        codes, grid = _stacked(blocks)
    v_q = QuantizedLayer.from_codes(first, codes, grid)
    v_hat = torch.block_diag(*dequantize(codes, grid).double().chunk(groups))
    w = weight_2d.detach().double()
    if stats is None:
        moment = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    else:
        cholesky, _ = damped_cholesky(stats, DAMPING)
        moment = cholesky @ cholesky.T
    u = least_squares_left(w, v_hat, moment)
    if stats is None:
        codes, grid = quantize_rtn(u, bits, None, kind)
    else:
        hidden = v_hat @ stats.input_cov.double() @ v_hat.T
        codes, grid = steer(u, bits, 1, kind, LayerStats(hidden, stats.samples))
    return v_q, QuantizedLayer.from_codes(second, codes, grid)


def _stacked(parts: list[tuple[Tensor, QuantGrid]]) -> tuple[Tensor, QuantGrid]:
    """Codes and grids of consecutive row blocks as one (their rows in order)."""
    grids = [grid for _, grid in parts]

    def rows(name: str) -> Tensor | None:
        tables = [getattr(grid, name) for grid in grids]
        return None if tables[0] is None else torch.cat(tables)

    first = grids[0]
    grid = QuantGrid(first.bits, first.kind, rows("scale"), rows("offset"), rows("zero"))
    return torch.cat([codes for codes, _ in parts]), grid
