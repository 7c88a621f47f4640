"""Second-order predictions of the calibration-loss change caused by a weight change d.

dL ~= g.d + 1/2 d'H d. The exact per-layer form uses one Hessian-vector product per candidate; the
trace form (HAWQ-V2 style) and the diagonal form are cheap approximations of the quadratic term
from Hutchinson estimates; `plan_quadratic` adds the cross-layer terms of a whole plan. Every
damage is in the calibration loss's units (nats for cross-entropy) and computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allot.profile.hvp import Curvature


@dataclass(frozen=True)
class SecondOrder:
    """Second-order loss change of one candidate: `linear` = g.d, `quadratic` = 1/2 d'H_ii d."""

    linear: float
    quadratic: float

    @property
    def total(self) -> float:
        """The predicted loss change g.d + 1/2 d'H_ii d."""
        return self.linear + self.quadratic


def second_order_terms(gradient: Tensor, delta: Tensor, form: float) -> SecondOrder:
    """g.d and 1/2 d'H d from the layer's gradient g, the change d and its quadratic form d'H d."""
    return SecondOrder(linear=_dot(gradient.double(), delta), quadratic=0.5 * form)


def second_order_damage(
    curvature: Curvature, name: str, deltas: Sequence[Tensor]
) -> list[SecondOrder]:
    """Exact second-order damage of each weight change in `deltas` (weight-shaped) of layer `name`.

    The gradient is shared by all layers (one sweep, cached); the quadratic terms cost
    1 + len(deltas) forward+backward equivalents together.
    """
    gradient = curvature.gradient()[name]
    forms = curvature.block_quadratics({name: list(deltas)})[name]
    return [second_order_terms(gradient, d, form) for d, form in zip(deltas, forms, strict=True)]


def trace_damage(trace: float, numel: int, delta: Tensor) -> float:
    """1/2 tr(H_i)/n_i |d|^2: the quadratic term if H_i were its mean eigenvalue times identity."""
    return 0.5 * trace / numel * float(delta.double().pow(2).sum())


def diagonal_damage(diagonal: Tensor, delta: Tensor) -> float:
    """1/2 sum_j diag(H_i)_j d_j^2: the quadratic term with H_i replaced by its diagonal."""
    return 0.5 * _dot(diagonal.double(), delta.double().pow(2))


def plan_quadratic(curvature: Curvature, deltas: dict[str, Tensor]) -> float:
    """1/2 d'H d for weight changes of several layers at once, cross-layer terms H_ij included.

    Layers absent from `deltas` are unchanged. Costs 2 forward+backward equivalents.
    """
    hvs = curvature.hvp(deltas)
    return 0.5 * sum(_dot(hvs[name], delta) for name, delta in deltas.items())


def _dot(a: Tensor, b: Tensor) -> float:
    """Float64 inner product of two same-shaped tensors (b moved to a's device)."""
    return float((a.double() * b.to(device=a.device, dtype=torch.float64)).sum())
