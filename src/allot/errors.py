"""Error models: predict a candidate's damage from its weight perturbation d = W_hat - W.

An error model takes every candidate's perturbation of every layer at once ({layer: [d, ...]},
weight-shaped) and the model's `Profile`, and returns one damage per perturbation; taking them
all together lets curvature models share passes over the data. A `layerwise` model (one whose
damages of a layer read only that layer's perturbations and statistics) is handed one layer at a
time instead, so that scoring holds one layer's dense perturbations, not the whole model's. Units differ between models, so
damages are only comparable within one model:
- `weight`: |d|^2, squared weight error.
- `weight-relative`: |d|^2 / |W|^2, the share of the layer's weight energy the change removes (for a
  truncated SVD: the discarded share of the squared singular values; SVD-Energy equalises it).
- `operator-relative`: |d|_2 / |W|_2 on the folded (out, fan_in) matrices, the relative
  operator-norm (largest singular value) error: the worst-case share of any input's output that
  the change alters. ALDS equalises it (bounded by `Grouped.error_bound`).
- `output`: mean over calibration input patches x of |dW x|^2 = tr(dW C dW') / n with
  C = sum x x' (the layer's input second moment): the squared output error the layer adds.
- `second-order`: g.d + 1/2 d'H_ii d, the calibration-loss change to second order, with one exact
  Hessian-vector product per candidate (nats for cross-entropy).
- `curvature`: 1/2 d'H_ii d alone, exact as above: the loss change of a model at a stationary point
  of its population loss. On a few hundred calibration samples the gradient term is mostly
  sampling noise (ResNet-20, 512 images: |g.d| is 1.2 standard errors in the median over all
  candidates), and an allocator choosing among hundreds of candidates picks exactly those whose
  noise is most negative; CET allocates on this model (docs/cet.md).
- `trace`: g.d + 1/2 tr(H_ii)/n_i |d|^2, H_ii replaced by its mean eigenvalue (Hutchinson).
- `diagonal`: g.d + 1/2 sum_j diag(H_ii)_j d_j^2, H_ii replaced by its diagonal (Hutchinson).
- `hawq`: HAWQ-V2's sensitivity Omega = tr(H_ii)/n_i |d|^2 (Hutchinson trace, no gradient term,
  no factor 1/2: as published, Dong et al. 2020).
- `measured`: the calibration-loss change measured with the candidate's layer alone changed (one
  pass over the calibration data per candidate, loss units): no Taylor truncation, so it holds for
  changes too large for the second-order model (a low-rank cut of a confident classifier's layer,
  where the softmax saturates and 1/2 d'H d is far below the real loss; docs/lowrank.md).
Other models register here the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from allot.discover import fold_weight_2d
from allot.exceptions import ConfigError
from allot.profile.damage import diagonal_damage, trace_damage
from allot.profile.engine import LayerProfile, Profile
from allot.registry import Registry

Deltas = dict[str, list[Tensor]]
Damages = dict[str, list[float]]


@dataclass(frozen=True)
class ErrorModel:
    """A named damage predictor: `damages(deltas, profile)` gives one float per perturbation.
    `curvature` says whether it reads Hessian information (plans chosen with it are then checked
    against the second-order model, `allot.prediction`); `loss_change` whether its damage is a
    predicted calibration-loss change itself, gradient term included (task-loss units);
    `layerwise` whether it may be called one layer at a time (its damages of a layer depend on
    nothing of the other layers and share no work with them)."""

    name: str
    damages: Callable[[Deltas, Profile], Damages]
    description: str = ""
    curvature: bool = False
    loss_change: bool = False
    layerwise: bool = False


def per_perturbation(damage: Callable[[Tensor, LayerProfile], float]) -> Callable:
    """Lift `damage(d, layer_profile)` of one perturbation to an error model's `damages`."""

    def damages(deltas: Deltas, profile: Profile) -> Damages:
        return {name: [damage(d, profile.layer(name)) for d in ds] for name, ds in deltas.items()}

    return damages


def _weight_error(delta: Tensor, _layer: LayerProfile) -> float:
    return float(delta.double().pow(2).sum())


def _relative_weight_error(delta: Tensor, layer: LayerProfile) -> float:
    energy = float(layer.weight().double().pow(2).sum())
    if energy == 0:
        raise ConfigError(f"layer {layer.name!r} has an all-zero weight: no relative error")
    return _weight_error(delta, layer) / energy


def spectral_norm(weight: Tensor) -> float:
    """|W|_2, the largest singular value of the folded (out, fan_in) matrix: the square root of
    the largest eigenvalue of its smaller Gram matrix, in float64 (several times cheaper than an
    SVD of a wide convolution weight)."""
    m = fold_weight_2d(weight.detach()).double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())


def _relative_operator_errors(deltas: Deltas, profile: Profile) -> Damages:
    damages = {}
    for name, ds in deltas.items():
        norm = spectral_norm(profile.layer(name).weight())
        if norm == 0:
            raise ConfigError(f"layer {name!r} has an all-zero weight: no relative error")
        damages[name] = [spectral_norm(d) / norm for d in ds]
    return damages


def _output_error(delta: Tensor, layer: LayerProfile) -> float:
    stats = layer.inputs()
    if stats.input_cov is None or stats.samples == 0:
        raise ConfigError(f"layer {layer.name!r} saw no calibration inputs; check the data")
    d = fold_weight_2d(delta).double()
    return float(((d @ stats.input_cov) * d).sum() / stats.samples)


def _linear(delta: Tensor, layer: LayerProfile) -> float:
    return float((layer.gradient().double() * delta.double()).sum())


def _trace(delta: Tensor, layer: LayerProfile) -> float:
    trace = layer.hessian_estimate().trace
    return _linear(delta, layer) + trace_damage(trace, delta.numel(), delta)


def _hawq(delta: Tensor, layer: LayerProfile) -> float:
    return 2 * trace_damage(layer.hessian_estimate().trace, delta.numel(), delta)


def _diagonal(delta: Tensor, layer: LayerProfile) -> float:
    return _linear(delta, layer) + diagonal_damage(layer.hessian_estimate().diagonal, delta)


def _second_order(deltas: Deltas, profile: Profile) -> Damages:
    return {
        name: [term.total for term in terms] for name, terms in profile.second_order(deltas).items()
    }


def _measured(deltas: Deltas, profile: Profile) -> Damages:
    return profile.measured(deltas)


def _curvature(deltas: Deltas, profile: Profile) -> Damages:
    return {
        name: [term.quadratic for term in terms]
        for name, terms in profile.second_order(deltas).items()
    }


ERROR_MODELS: Registry[ErrorModel] = Registry("error model")


def register_error_model(model: ErrorModel) -> ErrorModel:
    """Register an error model under its name (methods name it in `Method.error_model`)."""
    return ERROR_MODELS.add(model.name, model)


for _model in (
    ErrorModel(
        "weight", per_perturbation(_weight_error), "squared weight error |dW|_F^2", layerwise=True
    ),
    ErrorModel(
        "weight-relative",
        per_perturbation(_relative_weight_error),
        "share of the weight's energy removed |dW|_F^2 / |W|_F^2",
        layerwise=True,
    ),
    ErrorModel(
        "operator-relative",
        _relative_operator_errors,
        "relative operator-norm error |dW|_2 / |W|_2 (ALDS)",
        layerwise=True,
    ),
    ErrorModel(
        "output",
        per_perturbation(_output_error),
        "mean squared output error |dW x|^2",
        layerwise=True,
    ),
    ErrorModel(
        "second-order",
        _second_order,
        "loss change g.d + 1/2 d'Hd, exact HVP per candidate",
        curvature=True,
        loss_change=True,
    ),
    ErrorModel(
        "curvature",
        _curvature,
        "1/2 d'Hd without the gradient term, exact HVP per candidate",
        curvature=True,
    ),
    ErrorModel(
        "trace",
        per_perturbation(_trace),
        "g.d + 1/2 tr(H)/n |d|^2 (Hutchinson)",
        curvature=True,
        loss_change=True,
        layerwise=True,
    ),
    ErrorModel(
        "diagonal",
        per_perturbation(_diagonal),
        "g.d + 1/2 sum diag(H) d^2 (Hutchinson)",
        curvature=True,
        loss_change=True,
        layerwise=True,
    ),
    ErrorModel(
        "hawq",
        per_perturbation(_hawq),
        "HAWQ-V2: tr(H)/n |d|^2 (Hutchinson)",
        curvature=True,
        layerwise=True,
    ),
    ErrorModel(
        "measured",
        _measured,
        "loss change measured with the layer alone changed, one pass per candidate",
        loss_change=True,
    ),
):
    register_error_model(_model)


def get_error_model(name: str) -> ErrorModel:
    """The registered error model `name`; `ConfigError` listing the known ones otherwise."""
    return ERROR_MODELS[name]
