"""A plan's predictions checked against measurement, and its errors split by curvature geometry.

Both read the weight changes a plan really made, d_i = W_hat_i - W_i (the compressed layer's dense
weight minus the BatchNorm-folded float weight), and the calibration `Profile`:
- `check_prediction`: the loss change the second-order model predicts for the whole plan, with and
  without the cross-layer terms d_i' H_ij d_j, next to the measured change of the calibration loss
  and of the held-out loss (all in the task loss's units: nats for cross-entropy), and the same
  per layer, each layer changed alone.
- `operator_errors`: per layer, the relative operator-norm error |W_hat - W|_2 / |W|_2 the fitted
  scheme leaves, next to the bound the scheme states for it (ALDS's, `Grouped.error_bound`).
- `geometry`: per layer, the share of |d|^2 and of d'H_ii d that lies along the layer's top Lanczos
  eigenvectors (the high-curvature "minor axes"; the rest of the space holds the major axes), the
  loss change along its negative-curvature directions, and whether the layer sits at a saddle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from allot.data import Data
from allot.discover import get_weight
from allot.errors import spectral_norm
from allot.evaluate import metrics
from allot.modules.base import dense_weight
from allot.plan import Plan
from allot.profile.damage import plan_quadratic
from allot.profile.engine import Profile
from allot.profile.measure import loss_change, mean_loss


def plan_deltas(work: nn.Module, compressed: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """d_i = W_hat_i - W_i of every layer the plan changed (kept layers are left out)."""
    deltas = {}
    for layer in plan.layers:
        weight, _ = get_weight(work, layer.name)
        new = dense_weight(compressed.get_submodule(layer.name))
        delta = (new.detach() - weight.detach()).to(weight.dtype)
        if bool(delta.any()):
            deltas[layer.name] = delta
    return deltas


@dataclass(frozen=True)
class PredictionCheck:
    """Predicted and measured loss changes of a whole plan (task-loss units).

    `linear` = sum_i g_i.d_i; `per_layer` = linear + sum_i 1/2 d_i'H_ii d_i, the sum the allocator
    saw under the second-order model; `joint` = linear + 1/2 d'H d with the cross-layer terms.
    `measured_held_out` is None when the data's held-out evaluation reports no "loss". `layers`:
    per changed layer, its own predicted change g_i.d_i + 1/2 d_i'H_ii d_i and the measured
    change of the calibration loss when it alone is changed (every other layer float)."""

    linear: float
    per_layer: float
    joint: float
    measured_calibration: float
    measured_held_out: float | None
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_prediction(
    profile: Profile,
    deltas: dict[str, Tensor],
    work: nn.Module,
    compressed: nn.Module,
    data: Data,
) -> PredictionCheck:
    """Second-order predictions of the plan's loss change next to its measured changes.

    Costs one gradient sweep (cached), one second backward per changed layer, one full HVP, and
    one pass over the calibration data per changed layer (its own measured change)."""
    terms = profile.second_order({name: [d] for name, d in deltas.items()})
    linear = sum(t[0].linear for t in terms.values())
    per_layer = sum(t[0].total for t in terms.values())
    joint = linear + plan_quadratic(profile.curvature, deltas) if deltas else 0.0
    after, before = metrics(compressed, data).get("loss"), metrics(work, data).get("loss")
    reference = mean_loss(work, data)
    layers = {
        name: {
            "predicted": terms[name][0].total,
            "measured": loss_change(work, {name: delta}, data, reference),
        }
        for name, delta in deltas.items()
    }
    return PredictionCheck(
        linear=linear,
        per_layer=per_layer,
        joint=joint,
        measured_calibration=mean_loss(compressed, data) - reference,
        measured_held_out=None if after is None or before is None else after - before,
        layers=layers,
    )


def operator_errors(
    work: nn.Module, fitted: Mapping[str, nn.Module], plan: Plan
) -> dict[str, dict[str, float | None]]:
    """{layer: {"measured": |W_hat - W|_2 / |W|_2, "bound": the scheme's bound or None}} for
    every layer of `plan` fitted in `fitted` (modules as scoring fitted them, before any
    refinement), when some layer's scheme states a bound; {} otherwise."""
    bounds = {}
    for layer in plan.layers:
        weight, _ = get_weight(work, layer.name)
        bounds[layer.name] = layer.scheme.error_bound(weight)
    if all(bound is None for bound in bounds.values()):
        return {}
    result: dict[str, dict[str, float | None]] = {}
    for layer in plan.layers:
        if layer.name not in fitted:
            continue
        weight, _ = get_weight(work, layer.name)
        delta = dense_weight(fitted[layer.name]).detach() - weight
        result[layer.name] = {
            "measured": spectral_norm(delta) / spectral_norm(weight),
            "bound": bounds[layer.name],
        }
    return result


@dataclass(frozen=True)
class LayerGeometry:
    """Where one layer's error lies relative to its Hessian block's extreme eigenvectors.

    `top_error_share`: |P d|^2 / |d|^2 for P the projector on the positive top eigenvectors;
    `top_curvature_share`: sum_k lambda_k (u_k.d)^2 / d'H_ii d, the part of the quadratic damage
    those directions carry (None when d'H_ii d <= 0); `negative_curvature`: 1/2 sum over the
    negative eigenpairs of lambda (u.d)^2, the loss change along saddle directions (<= 0);
    `saddle`: the smallest eigenvalue is certainly negative (`RitzPairs.saddle`)."""

    eigenvectors: int
    top_error_share: float
    top_curvature_share: float | None
    negative_curvature: float
    saddle: bool


def geometry(profile: Profile, deltas: dict[str, Tensor]) -> dict[str, LayerGeometry]:
    """The geometry split of every changed layer's error (uses the profile's Lanczos pairs and one
    exact d'H_ii d per layer, shared with `check_prediction` through the profile's cache)."""
    terms = profile.second_order({name: [d] for name, d in deltas.items()})
    pairs = profile.eigenpairs()
    result = {}
    for name, delta in deltas.items():
        d = delta.detach().double().flatten().cpu()
        p = pairs[name]
        projections = p.vectors.T @ d
        weighted = p.values * projections**2
        top = torch.zeros_like(p.values, dtype=torch.bool)
        top[: profile.settings.eigenpairs] = True  # the largest pairs come first
        top &= p.values > 0
        quadratic = 2 * terms[name][0].quadratic
        result[name] = LayerGeometry(
            eigenvectors=int(top.sum()),
            top_error_share=float((projections[top] ** 2).sum() / d.pow(2).sum()),
            top_curvature_share=float(weighted[top].sum() / quadratic) if quadratic > 0 else None,
            negative_curvature=0.5 * float(weighted[p.values < 0].sum()),
            saddle=p.saddle,
        )
    return result


def geometry_json(split: dict[str, LayerGeometry]) -> dict[str, dict]:
    return {name: asdict(g) for name, g in split.items()}
