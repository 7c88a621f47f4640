"""Sum: an additive combination of schemes (LC Part V), e.g. quantized + sparse.

The layer's weight is W ~ sum_k Delta_k, each part stored by its own scheme; storage is the exact
sum of the parts' storage. Fitting is the LC C step for a sum: alternating over the parts, each
part fitted by its own scheme to the residual the others leave, W - sum_{j != k} Delta_j, starting
from all parts at zero, for `repeats` rounds. A part's new fit replaces its old one only when it
leaves a smaller residual |W - sum_j Delta_j|_F, so the residual never increases from one step to
the next (each part's own fit minimises its own objective, which for steered or data-aware parts
is not the plain weight error).

`compress` fits each part with its own `compress` (steered parts on the layer's profile);
`project`, LC's C step, with its own `project` (plain weight error), starting from the previous C
step's parts when given (warm start): the first round then only accepts part fits that improve
on them, so a C step never leaves a larger residual than the previous Theta does.

A sum re-fits (`refit`, error feedback) when one of its parts does: the same alternation, the
parts that re-fit re-fitted under the new input moments and the residual judged under them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError, PlanError
from allot.modules.base import (
    CompressedLayer,
    check_layer_tensors,
    dense_weight,
    layer_storage_bits,
)
from allot.modules.combo import SumLayer
from allot.schemes.base import (
    Scheme,
    check_int_field,
    parse_scheme,
    register_scheme,
    scheme_from_json,
)
from allot.schemes.steer import DAMPING

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile
    from allot.stats import LayerStats

REPEATS = 10


@register_scheme
@dataclasses.dataclass(frozen=True)
class Sum(Scheme):
    """The sum of two or more `parts` (schemes other than Keep and Sum); `quant:1+sparse:0.02`.
    `repeats` is the number of alternating rounds of the fit."""

    kind: ClassVar[str] = "sum"
    parts: tuple[Scheme, ...]
    repeats: int = REPEATS

    def __post_init__(self) -> None:
        parts = tuple(self.parts) if isinstance(self.parts, (tuple, list)) else self.parts
        if not isinstance(parts, tuple) or len(parts) < 2:
            raise ConfigError(f"Sum.parts must hold at least two schemes, got {self.parts!r:.80}")
        for part in parts:
            if not isinstance(part, Scheme) or part.kind in ("keep", "sum"):
                raise ConfigError(
                    f"Sum.parts must be compressing schemes (not keep, not another sum), got {part!r:.60}"
                )
        object.__setattr__(self, "parts", parts)
        check_int_field("Sum", "repeats", self.repeats, 1, 1000)

    @property
    def kinds(self) -> str:
        return "+".join(part.kinds for part in self.parts)

    def label(self) -> str:
        return "+".join(part.label() for part in self.parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "parts": [p.to_json() for p in self.parts],
            "repeats": self.repeats,
        }

    @classmethod
    def from_params(cls, params: dict[str, Any], where: str, depth: int) -> Sum:
        parts = params.get("parts")
        if not isinstance(parts, list):
            raise PlanError(f"{where}.parts: expected a list of schemes, got {parts!r:.80}")
        built = [
            scheme_from_json(part, f"{where}.parts[{i}]", depth + 1) for i, part in enumerate(parts)
        ]
        return super().from_params({**params, "parts": tuple(built)}, where, depth)

    def check(self, spec: LayerSpec) -> None:
        inner = _inner(spec)
        for part in self.parts:
            part.check(inner)

    def storage_bits(self, spec: LayerSpec) -> int:
        inner = _inner(spec)
        return sum(part.storage_bits(inner) for part in self.parts)

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> SumLayer:
        inner = _inner(spec)
        return self._alternate(
            weight,
            bias,
            spec,
            lambda part, residual, _: part.compress(residual, None, inner, profile),
        )

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> SumLayer:
        """LC's C step for a sum: the parts' own C steps alternated on the residual, from the
        `previous` C step's parts (a `SumLayer` of the same parts) or from zero."""
        inner = _inner(spec)
        start = None
        if isinstance(previous, SumLayer) and len(previous.parts) == len(self.parts):
            start = list(previous.parts)
            if any(
                layer_storage_bits(module) != part.storage_bits(inner)
                for module, part in zip(start, self.parts, strict=True)
            ):
                start = None  # another sum's parts: start from zero
        return self._alternate(
            target,
            bias,
            spec,
            lambda part, residual, old: part.project(residual, None, inner, old),
            start,
        )

    @property
    def refits(self) -> bool:
        """A sum re-fits (error feedback) when one of its parts does."""
        return any(part.refits for part in self.parts)

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> SumLayer:
        """The sum fitted to `target` under the input second moments `stats`: the parts
        alternated on the residual as in `compress`, those that re-fit by their `refit` under
        `stats`, the others by their own fit; a part's new fit is kept only when it lowers the
        residual measured under the same moments, tr(R (M + lam I) R') with lam = `DAMPING` times
        the mean diagonal of M (the objective error feedback minimises)."""
        if not self.refits:
            return super().refit(target, bias, spec, stats)
        inner = _inner(spec)
        assert stats.input_cov is not None
        second = stats.input_cov
        metric = second + DAMPING * float(second.diagonal().mean()) * torch.eye(
            second.shape[0], dtype=second.dtype, device=second.device
        )

        def fit(part: Scheme, residual: Tensor, _old: nn.Module | None) -> nn.Module:
            if part.refits:
                return part.refit(residual, None, inner, stats)
            return part.compress(residual, None, inner)

        def error(target: Tensor, approximation: Tensor) -> float:
            difference = fold_weight_2d(target - approximation).double()
            return float(((difference @ metric) * difference).sum())

        return self._alternate(target, bias, spec, fit, error=error)

    def _alternate(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        fit: Callable[[Scheme, Tensor, nn.Module | None], nn.Module],
        start: list[nn.Module] | None = None,
        error: Callable[[Tensor, Tensor], float] | None = None,
    ) -> SumLayer:
        """`repeats` rounds over the parts, each part re-fitted by `fit(part, residual, its
        current module)` to the residual the others leave and kept only if that lowers the
        residual (its squared Frobenius norm, or `error(residual, fit)`); parts start at
        `start`'s modules, or at zero."""
        error = error or _error
        check_layer_tensors(spec, weight, bias)
        self.check(spec)
        target = weight.detach()
        fitted: list[nn.Module | None] = [None] * len(self.parts)
        dense = [torch.zeros_like(target) for _ in self.parts]
        if start is not None:
            fitted = [copy.deepcopy(module) for module in start]
            dense = [dense_weight(module).detach() for module in fitted]
        for _ in range(self.repeats):
            for k, part in enumerate(self.parts):
                others = sum((d for j, d in enumerate(dense) if j != k), torch.zeros_like(target))
                residual = target - others
                module = fit(part, residual, fitted[k])
                assert isinstance(module, CompressedLayer)
                candidate = module.reconstruct().detach()
                if fitted[k] is None or error(residual, candidate) < error(residual, dense[k]):
                    fitted[k], dense[k] = module, candidate
        return SumLayer(spec, [m for m in fitted if isinstance(m, CompressedLayer)], bias)

    def empty(self, spec: LayerSpec) -> SumLayer:
        self.check(spec)
        inner = _inner(spec)
        return SumLayer(spec, [part.empty(inner) for part in self.parts])

    @classmethod
    def parse_args(cls, args: list[str]) -> Sum:
        return cls(tuple(parse_scheme(text) for text in args))


def _inner(spec: LayerSpec) -> LayerSpec:
    """The parts' geometry: the layer's, without a bias (the sum holds it)."""
    return spec.with_channels(bias=False)


def _error(target: Tensor, approximation: Tensor) -> float:
    return float((target - approximation).double().pow(2).sum())
