"""Second-order damage against the exact quadratic form and against measured loss changes."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hessians import pairs
from torch import Tensor, nn
from torch.func import functional_call

from allot.profile.damage import (
    diagonal_damage,
    plan_quadratic,
    second_order_damage,
    trace_damage,
)
from allot.profile.hvp import Curvature

NAMES = ["0", "3"]


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, list, Tensor]:
    """A float64 conv net (Conv2d, then Linear), three calibration batches of different sizes, and
    the exact Hessian of the calibration loss w.r.t. both weights (computed once: it is slow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    batches = [
        (torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (n,))) for n in (4, 2, 5)
    ]
    return model, batches, exact_hessian(model, batches)


def loss_at(model: nn.Module, batches: list, deltas: dict[str, Tensor]) -> float:
    """Calibration loss (all samples at once) with each named weight moved by its delta."""
    params = {f"{n}.weight": model.get_submodule(n).weight.detach() + d for n, d in deltas.items()}
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(model, params, (x,)), y))


def exact_hessian(model: nn.Module, batches: list) -> Tensor:
    """Hessian of the calibration loss w.r.t. the concatenated weights of NAMES."""
    shapes = [model.get_submodule(n).weight.shape for n in NAMES]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(flat: Tensor) -> Tensor:
        chunks = flat.split([math.prod(s) for s in shapes])
        params = {f"{n}.weight": c.view(s) for n, c, s in zip(NAMES, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([model.get_submodule(n).weight.detach().flatten() for n in NAMES])
    return torch.autograd.functional.hessian(loss, flat).detach()


def test_exact_damage_equals_the_quadratic_form(problem) -> None:
    model, batches, hessian = problem
    hessian = hessian[:54, :54]  # the conv layer's block
    curvature = Curvature(model, NAMES, pairs(batches))
    gradient = curvature.gradient()["0"]
    deltas = [0.1 * torch.randn(3, 2, 3, 3, dtype=torch.float64) for _ in range(3)]
    damages = second_order_damage(curvature, "0", deltas)
    for damage, delta in zip(damages, deltas, strict=True):
        d = delta.flatten()
        assert damage.linear == pytest.approx(float(gradient.flatten() @ d), rel=1e-10)
        assert damage.quadratic == pytest.approx(0.5 * float(d @ hessian @ d), rel=1e-6)
        assert damage.total == damage.linear + damage.quadratic
    assert curvature.passes.fb_equivalents == 1 + 1 + 3  # gradient, then one shared HVP sweep


def test_second_order_prediction_error_shrinks_like_the_cube(problem) -> None:
    model, batches, _ = problem
    curvature = Curvature(model, NAMES, pairs(batches))
    base = loss_at(model, batches, {})
    direction = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    scales = [0.04, 0.02, 0.01]
    damages = second_order_damage(curvature, "0", [t * direction for t in scales])
    errors = [
        abs(loss_at(model, batches, {"0": t * direction}) - base - damage.total)
        for t, damage in zip(scales, damages, strict=True)
    ]
    for larger, smaller in itertools.pairwise(errors):
        assert 5 < larger / smaller < 11  # 8 for a pure third-order remainder
    # The quadratic term accounts for nearly all of what the linear term misses.
    assert errors[-1] < 0.05 * abs(damages[-1].quadratic)


def test_plan_quadratic_includes_cross_layer_terms(problem) -> None:
    model, batches, hessian = problem
    curvature = Curvature(model, NAMES, pairs(batches))
    deltas = {n: 0.05 * torch.randn_like(model.get_submodule(n).weight) for n in NAMES}
    d = torch.cat([deltas[n].flatten() for n in NAMES])
    quadratic = plan_quadratic(curvature, deltas)
    assert quadratic == pytest.approx(0.5 * float(d @ hessian @ d), rel=1e-6)
    per_layer = sum(second_order_damage(curvature, n, [deltas[n]])[0].quadratic for n in NAMES)
    cross = float(d[:54] @ hessian[:54, 54:] @ d[54:])
    assert quadratic - per_layer == pytest.approx(cross, rel=1e-6)
    # The whole plan's loss change is predicted to third order as well.
    gradient = curvature.gradient()
    predicted = quadratic + sum(float((gradient[n] * deltas[n]).sum()) for n in NAMES)
    small = {n: 0.1 * v for n, v in deltas.items()}
    error = abs(loss_at(model, batches, deltas) - loss_at(model, batches, {}) - predicted)
    small_predicted = 0.01 * quadratic + 0.1 * (predicted - quadratic)
    small_error = abs(
        loss_at(model, batches, small) - loss_at(model, batches, {}) - small_predicted
    )
    assert small_error < error / 200  # 1000 for a pure third-order remainder


def test_trace_and_diagonal_damage_are_the_approximate_quadratic_terms(problem) -> None:
    block = problem[2][54:, 54:]  # the linear layer's block
    # With a Rademacher step of size eps, |d|^2 = eps^2 n and E[1/2 d'Hd] = 1/2 eps^2 tr(H).
    eps = 0.01
    delta = eps * (torch.randint(0, 2, (4, 12), dtype=torch.float64) * 2 - 1)
    assert trace_damage(float(block.trace()), 48, delta) == pytest.approx(
        0.5 * eps**2 * float(block.trace()), rel=1e-12
    )
    # Along one coordinate the diagonal model is exact.
    diagonal = block.diagonal().view(4, 12)
    single = torch.zeros(4, 12, dtype=torch.float64)
    single[2, 5] = eps
    exact = 0.5 * float(single.flatten() @ block @ single.flatten())
    assert diagonal_damage(diagonal, single) == pytest.approx(exact, rel=1e-12)
    assert diagonal_damage(diagonal, delta) == pytest.approx(0.5 * eps**2 * float(block.trace()))


def test_damage_leaves_the_model_unchanged(problem) -> None:
    model, batches, _ = problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curvature = Curvature(model, NAMES, pairs(batches))
    second_order_damage(curvature, "3", [torch.ones(4, 12, dtype=torch.float64)])
    plan_quadratic(curvature, {"0": torch.ones(3, 2, 3, 3, dtype=torch.float64)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
