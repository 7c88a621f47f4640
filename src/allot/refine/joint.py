"""The joint step of lossless low-rank factorization: each factorized layer's factors moved
towards directions in which the calibration loss is flat or falling, the rest of the model frozen.

Our reconstruction of the joint factorization-error / loss objective of Zhang et al. (2024,
docs/lowrank.md). Layers are taken in plan order; each one is first re-fitted by error feedback
(`refit_layer`: on the inputs the compressed layers before it produce, towards feedback's target T)
and then, with P = U V its folded weight, W the float weight and D = P - W, its factors U, V are
moved to lower

    F(U, V) = e(P) + lam q(D),   e(P) = tr((P - T) A (P - T)'),   q(D) = g.D + 1/2 D'H D

where A = M_qq / N + damping (the damped mean second moment of the layer's inputs in the
compressed model, so e is feedback's objective, minimised over rank-r weights by the whitened
re-fit), and g, H = H_ii are the float model's calibration-loss gradient and Hessian block of the
layer (q is the second-order loss change the allocator predicted with; H D comes from exact
Hessian-vector products, `Curvature.layer_hvps`). lam = `weight` e(P0) / (1/2 D0'H D0): the loss
term weighs `weight` times the output error at the start.

Each iteration steps along a preconditioned descent direction (dU, dV) =
(G V'(V A V')^-1, (U'U)^-1 U' G A^-1), G = dF/dP = 2 (P - T) A + lam (g + H D). Along it
P(t) = (U - t dU)(V - t dV) = P - t E1 + t^2 E2, so F(t) is a quartic in t whose coefficients are
exact given H E1 and H E2 (one sweep over the calibration data, both products sharing it; H D is
then updated exactly, H being linear). The step t minimises that quartic over 0 <= t <= t_max, with
|t_max E1| = |D0| (the second-order model is trusted within the size of the layer's own
factorization error), so F never increases. The factors are then re-balanced (same product).

The step is kept for a layer only where it helps: the calibration loss is measured before and
after the layer's iterations, and the layer goes back to its re-fitted factors when the loss rose.
Per layer, `plan.metadata["lowrank_joint"]` records lam, the iterations taken, F and q before and after,
the measured losses and whether the step was kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from allot.data import Data
from allot.discover import fold_weight_2d, get_weight
from allot.exceptions import ConfigError
from allot.modules.lowrank import LowRankLayer
from allot.plan import Plan
from allot.profile.activations import damped_cholesky
from allot.profile.hvp import Curvature
from allot.profile.measure import mean_loss
from allot.progress import progress_bar
from allot.refine.feedback import refit_layer
from allot.schemes.steer import DAMPING


@dataclass(frozen=True)
class JointSettings:
    """`iterations` per layer (each one sweep over the calibration data with two Hessian-vector
    products) and `weight`, the loss term's weight relative to the output error at the start."""

    iterations: int = 4
    weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise ConfigError(f"iterations must be an int, got {self.iterations!r}")
        if not 0 <= self.iterations <= 100:
            raise ConfigError(f"iterations must be in 0..100, got {self.iterations}")
        if not isinstance(self.weight, (int, float)) or not 0 < self.weight < float("inf"):
            raise ConfigError(f"weight must be a positive finite number, got {self.weight!r}")


@dataclass
class Objective:
    """F = e + lam q of one layer (float64, folded): target `target` T, damped input moment
    `moment` A (with its lower Cholesky factor `cholesky`), float weight `weight` W, gradient
    `gradient` g."""

    target: Tensor
    moment: Tensor
    cholesky: Tensor
    weight: Tensor
    gradient: Tensor
    lam: float = 0.0

    def output_error(self, product: Tensor) -> float:
        """e(P) = tr((P - T) A (P - T)') in squared output units."""
        residual = product - self.target
        return float(((residual @ self.moment) * residual).sum())

    def loss_change(self, product: Tensor, curved: Tensor) -> float:
        """q = g.D + 1/2 D'H D for D = P - W, given `curved` = H D (loss units)."""
        delta = product - self.weight
        return float((self.gradient * delta).sum() + 0.5 * (curved * delta).sum())

    def value(self, product: Tensor, curved: Tensor) -> float:
        return self.output_error(product) + self.lam * self.loss_change(product, curved)

    def direction(self, u: Tensor, v: Tensor, curved: Tensor) -> tuple[Tensor, Tensor]:
        """(dU, dV): the preconditioned gradient, a descent direction of F (F falls along -dU,
        -dV)."""
        grad = 2 * (u @ v - self.target) @ self.moment + self.lam * (self.gradient + curved)
        du = grad @ v.T @ torch.linalg.pinv(v @ self.moment @ v.T, hermitian=True)
        scaled = torch.cholesky_solve(grad.T, self.cholesky).T  # G A^-1
        dv = torch.linalg.pinv(u.T @ u, hermitian=True) @ u.T @ scaled
        return du, dv

    def quartic(
        self, product: Tensor, curved: Tensor, e1: Tensor, e2: Tensor, h1: Tensor, h2: Tensor
    ) -> np.ndarray:
        """Coefficients c0..c4 of F(P - t E1 + t^2 E2) as a polynomial in t, with H D = `curved`,
        H E1 = `h1`, H E2 = `h2` (exact: F is quadratic in P)."""

        def inner(x: Tensor, y: Tensor) -> float:
            return float(((x @ self.moment) * y).sum())

        def dot(x: Tensor, y: Tensor) -> float:
            return float((x * y).sum())

        r = product - self.target
        d = product - self.weight
        g = self.gradient
        error = [
            inner(r, r),
            -2 * inner(r, e1),
            inner(e1, e1) + 2 * inner(r, e2),
            -2 * inner(e1, e2),
            inner(e2, e2),
        ]
        loss = [
            dot(g, d) + 0.5 * dot(curved, d),
            -(dot(g, e1) + dot(curved, e1)),
            dot(g, e2) + dot(curved, e2) + 0.5 * dot(h1, e1),
            -dot(h2, e1),
            0.5 * dot(h2, e2),
        ]
        return np.array(error) + self.lam * np.array(loss)


def best_step(coefficients: np.ndarray, t_max: float) -> float:
    """The t in [0, t_max] minimising the quartic sum_k c_k t^k (0 when nothing is lower than
    at t = 0)."""
    polynomial = np.polynomial.Polynomial(coefficients)
    roots = polynomial.deriv().roots()
    points = [0.0, t_max]
    points += [float(r.real) for r in roots if abs(r.imag) < 1e-12 and 0 < r.real < t_max]
    values = [float(polynomial(t)) for t in points]
    best = int(np.argmin(values))
    return points[best] if values[best] < values[0] else 0.0


def balanced(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The same product U V with both factors carrying each component's singular value equally."""
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v.T)
    a, s, bt = torch.linalg.svd(ru @ rv.T)
    root = s.sqrt()
    return qu @ (a * root), (root[:, None] * bt) @ qv.T


def joint(
    reference: nn.Module,
    model: nn.Module,
    plan: Plan,
    data: Data,
    settings: JointSettings,
    progress: bool = True,
) -> nn.Module:
    """Error feedback and the joint step on every low-rank layer of `model` (the plan applied to
    `reference`, the float BatchNorm-folded model), in plan order, in place; returns `model`."""
    layers = [
        layer for layer in plan.layers if isinstance(model.get_submodule(layer.name), LowRankLayer)
    ]
    if not layers:
        return model.eval()
    curvature = Curvature(reference, [layer.name for layer in layers], data)
    gradients = curvature.gradient()
    records: dict[str, dict[str, Any]] = {}
    for layer in progress_bar(layers, "joint low-rank step", progress):
        target, stats = refit_layer(reference, model, layer, data)
        weight, _ = get_weight(reference, layer.name)
        cholesky, _ = damped_cholesky(stats, DAMPING)
        objective = Objective(
            target,
            cholesky @ cholesky.T,
            cholesky,
            fold_weight_2d(weight).double(),
            fold_weight_2d(gradients[layer.name]).double(),
        )
        records[layer.name] = _step_layer(curvature, model, layer.name, objective, data, settings)
    plan.metadata["lowrank_joint"] = records
    return model.eval()


def _step_layer(
    curvature: Curvature,
    model: nn.Module,
    name: str,
    objective: Objective,
    data: Data,
    settings: JointSettings,
) -> dict[str, Any]:
    """The joint iterations of one layer (module docstring), kept only if the measured
    calibration loss does not rise; what happened, for the plan's metadata."""
    module = model.get_submodule(name)
    assert isinstance(module, LowRankLayer)
    shape = module.spec.weight_shape

    def hvps(*vectors: Tensor) -> list[Tensor]:
        products = curvature.layer_hvps(name, [x.reshape(shape) for x in vectors])
        return [fold_weight_2d(p).double() for p in products]

    with torch.no_grad():
        u, v = module.u.detach().double(), module.v.detach().double()
        product = u @ v
        (curved,) = hvps(product - objective.weight)
        error = objective.output_error(product)
        quadratic = 0.5 * float((curved * (product - objective.weight)).sum())
        record: dict[str, Any] = {"output_error": [error], "loss_change": []}
        record["loss_change"].append(objective.loss_change(product, curved))
        if error <= 0 or quadratic <= 0 or settings.iterations == 0:
            record["skipped"] = "no output error or no positive curvature along the error"
            return record
        objective.lam = settings.weight * error / quadratic
        radius = float((product - objective.weight).norm())
        start = objective.value(product, curved)
        before = mean_loss(model, data)
        taken = 0
        for _ in range(settings.iterations):
            du, dv = objective.direction(u, v, curved)
            e1, e2 = du @ v + u @ dv, du @ dv
            h1, h2 = hvps(e1, e2)
            t = best_step(
                objective.quartic(product, curved, e1, e2, h1, h2),
                radius / max(float(e1.norm()), 1e-300),
            )
            if t == 0.0:
                break
            u, v = balanced(u - t * du, v - t * dv)
            product = u @ v
            curved = curved - t * h1 + t * t * h2
            taken += 1
        record.update(
            lam=objective.lam,
            iterations=taken,
            objective=[start, objective.value(product, curved)],
        )
        record["output_error"].append(objective.output_error(product))
        record["loss_change"].append(objective.loss_change(product, curved))
        fitted = (module.u.detach().clone(), module.v.detach().clone())
        module.u.copy_(u.to(module.u.dtype))
        module.v.copy_(v.to(module.v.dtype))
        after = mean_loss(model, data)
        record.update(calibration_loss=[before, after], kept=after <= before)
        if after > before:
            module.u.copy_(fitted[0])
            module.v.copy_(fitted[1])
    return record
