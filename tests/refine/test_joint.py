"""The joint low-rank step: its quartic line search against the objective computed directly with
the exact (autograd) Hessian, its descent direction, and the refiner on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessians import exact, setup

from allot import Budget, Refinement, compress
from allot.exceptions import ConfigError
from allot.methods import get_method
from allot.modules.lowrank import LowRankLayer
from allot.profile.measure import mean_loss
from allot.refine import get_refiner
from allot.refine.joint import Objective, balanced, best_step
from allot.zoo import create_model


def _objective(seed: int = 0, lam: float = 0.7) -> tuple[Objective, torch.Tensor, torch.Tensor]:
    """The objective of layer "3" (Linear 6 -> 4) of the float64 test MLP with its exact Hessian
    block, a random target and input moment, and random rank-2 factors."""
    torch.manual_seed(seed)
    model, names, batches = setup("mlp")
    gradient, hessian = exact(model, names, batches)
    block = slice(30, 54)  # layer "0" holds 5 * 6 = 30 weights, layer "3" 6 * 4 = 24
    g = gradient[block].view(4, 6)
    h = hessian[block, block]
    x = torch.randn(20, 6, dtype=torch.float64)
    moment = x.T @ x / 20 + 0.01 * torch.eye(6, dtype=torch.float64)
    weight = model[3].weight.detach()
    objective = Objective(
        target=weight + 0.1 * torch.randn(4, 6, dtype=torch.float64),
        moment=moment,
        cholesky=torch.linalg.cholesky(moment),
        weight=weight,
        gradient=g,
        lam=lam,
    )
    return objective, h, torch.randn(4, 2, dtype=torch.float64)


def _value(objective: Objective, hessian: torch.Tensor, product: torch.Tensor) -> float:
    curved = (hessian @ (product - objective.weight).flatten()).view(4, 6)
    return objective.value(product, curved)


def test_the_quartic_is_the_objective_along_the_step() -> None:
    objective, hessian, u = _objective()
    v = torch.randn(2, 6, dtype=torch.float64)
    product = u @ v
    curved = (hessian @ (product - objective.weight).flatten()).view(4, 6)
    du, dv = objective.direction(u, v, curved)
    e1, e2 = du @ v + u @ dv, du @ dv
    h1, h2 = ((hessian @ e.flatten()).view(4, 6) for e in (e1, e2))
    polynomial = np.polynomial.Polynomial(objective.quartic(product, curved, e1, e2, h1, h2))
    for t in (0.0, 0.1, 0.5, 1.3, -0.4):
        direct = _value(objective, hessian, (u - t * du) @ (v - t * dv))
        assert polynomial(t) == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_the_direction_descends_as_fast_as_autograd_says() -> None:
    objective, hessian, u = _objective(seed=1)
    v = torch.randn(2, 6, dtype=torch.float64)
    u_, v_ = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    product = u_ @ v_
    delta = (product - objective.weight).flatten()
    residual = product - objective.target
    value = ((residual @ objective.moment) * residual).sum() + objective.lam * (
        (objective.gradient.flatten() * delta).sum() + 0.5 * delta @ hessian @ delta
    )
    grad_u, grad_v = torch.autograd.grad(value, (u_, v_))
    curved = (hessian @ (u @ v - objective.weight).flatten()).view(4, 6)
    du, dv = objective.direction(u, v, curved)
    slope = -float((grad_u * du).sum() + (grad_v * dv).sum())
    assert slope < 0
    e1, e2 = du @ v + u @ dv, du @ dv
    h1, h2 = ((hessian @ e.flatten()).view(4, 6) for e in (e1, e2))
    assert objective.quartic(u @ v, curved, e1, e2, h1, h2)[1] == pytest.approx(slope, rel=1e-9)


def test_best_step_is_the_minimum_on_the_interval() -> None:
    coefficients = np.array([1.0, -3.0, 0.5, 1.0, -0.2])
    t = best_step(coefficients, 4.0)
    grid = np.linspace(0, 4.0, 40001)
    values = np.polynomial.Polynomial(coefficients)(grid)
    assert np.polynomial.Polynomial(coefficients)(t) <= values.min() + 1e-9
    assert best_step(np.array([0.0, 1.0, 1.0, 0.0, 0.0]), 2.0) == 0.0  # rising: no step


def test_balanced_keeps_the_product_and_balances_the_factors() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 3, generator=g, dtype=torch.float64) * torch.tensor([10.0, 1.0, 0.1])
    v = torch.randn(3, 7, generator=g, dtype=torch.float64)
    bu, bv = balanced(u, v)
    torch.testing.assert_close(bu @ bv, u @ v)
    torch.testing.assert_close(bu.norm(dim=0), bv.norm(dim=1))


def test_joint_refinement_lowers_its_objective_and_keeps_only_what_helps(digits) -> None:
    method = get_method("lowrank-lossless")
    result = compress(create_model("test-cnn"), digits, method, Budget("ratio", 2), progress=False)
    assert result.plan.metadata["refine"]["name"] == "lowrank-joint"
    records = result.plan.metadata["lowrank_joint"]
    assert records
    for name, record in records.items():
        assert isinstance(result.model.get_submodule(name), LowRankLayer)
        if "skipped" in record:
            continue
        start, end = record["objective"]
        assert end <= start
        before, after = record["calibration_loss"]
        assert record["kept"] == (after <= before)
    feedback = compress(
        create_model("test-cnn"),
        digits,
        method,
        Budget("ratio", 2),
        refinement=Refinement.of(method, "feedback"),
        progress=False,
    )
    assert feedback.plan.weight_bits == result.plan.weight_bits
    again = compress(create_model("test-cnn"), digits, method, Budget("ratio", 2), progress=False)
    assert again.plan.dumps() == result.plan.dumps()  # same seed, same plan and factors
    first, second = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    kept = [r for r in records.values() if r.get("kept")]
    if kept:  # a kept step lowered the loss where it ran
        assert mean_loss(result.model, digits) <= max(r["calibration_loss"][0] for r in kept)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"iterations": -1}, "iterations"), ({"weight": 0}, "weight"), ({"steps": 2}, "no setting")],
)
def test_bad_settings_are_named(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        get_refiner("lowrank-joint").configure(settings)
