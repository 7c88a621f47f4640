"""Hutchinson trace and diagonal estimates against exact values."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.exceptions import ConfigError
from allot.profile.hutchinson import hutchinson
from allot.profile.hvp import Curvature


def symmetric(n: int, seed: int) -> Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a + a.T + 2 * n * torch.eye(n, dtype=torch.float64)


def matrix_matvec(a: Tensor, shape: tuple[int, ...]):
    return lambda z: (a @ z.flatten()).view(shape)


def test_trace_is_within_three_standard_errors_and_the_rule_stops_it() -> None:
    a = symmetric(30, seed=1)
    estimate = hutchinson(
        matrix_matvec(a, (5, 6)), (5, 6), 4, 500, 0.01, torch.Generator().manual_seed(0)
    )
    assert estimate.converged
    assert 4 <= estimate.probes < 500
    assert estimate.trace_stderr <= 0.01 * abs(estimate.trace)
    assert abs(estimate.trace - float(a.trace())) <= 3 * estimate.trace_stderr


def test_diagonal_is_close_with_honest_standard_errors() -> None:
    a = symmetric(20, seed=2)
    estimate = hutchinson(
        matrix_matvec(a, (20,)), (20,), 2000, 2000, 0.0, torch.Generator().manual_seed(0)
    )
    assert estimate.probes == 2000 and not estimate.converged
    # Var(z_j (A z)_j) = sum over k != j of A_jk^2 for Rademacher z.
    off_diagonal = (a.pow(2).sum(1) - a.diagonal().pow(2)).sqrt() / 2000**0.5
    torch.testing.assert_close(estimate.diagonal_stderr, off_diagonal, rtol=0.1, atol=0)
    assert ((estimate.diagonal - a.diagonal()).abs() <= 4.5 * estimate.diagonal_stderr).all()
    assert estimate.diagonal.shape == (20,)


def test_a_diagonal_operator_is_exact_after_the_minimum_probes() -> None:
    d = torch.linspace(-1, 3, 12, dtype=torch.float64).view(3, 4)
    estimate = hutchinson(lambda z: d * z, (3, 4), 3, 100, 1e-9, torch.Generator().manual_seed(0))
    assert estimate.probes == 3 and estimate.converged
    assert estimate.trace == pytest.approx(float(d.sum()), rel=1e-12)
    torch.testing.assert_close(estimate.diagonal, d)
    assert estimate.trace_stderr == pytest.approx(0.0, abs=1e-12)


def test_the_same_seed_gives_the_same_estimate() -> None:
    a = symmetric(10, seed=3)
    runs = [
        hutchinson(matrix_matvec(a, (10,)), (10,), 5, 50, 0.02, torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0].trace == runs[1].trace and runs[0].probes == runs[1].probes
    assert torch.equal(runs[0].diagonal, runs[1].diagonal)
    other = hutchinson(
        matrix_matvec(a, (10,)), (10,), 5, 50, 0.02, torch.Generator().manual_seed(8)
    )
    assert other.trace != runs[0].trace


def test_trace_of_a_layer_hessian_through_hvps() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 4)]
    curvature = Curvature(model, ["0", "2"], batches, F.cross_entropy)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(w: Tensor) -> Tensor:
        return F.cross_entropy(model[2](torch.tanh(F.linear(x, w, model[0].bias))), y)

    hessian = torch.autograd.functional.hessian(loss, model[0].weight.detach()).view(20, 20)
    estimate = hutchinson(
        lambda z: curvature.layer_hvp("0", z), (5, 4), 8, 64, 0.05, torch.Generator().manual_seed(0)
    )
    assert abs(estimate.trace - float(hessian.trace())) <= 3 * estimate.trace_stderr
    assert curvature.passes.fb_equivalents == 2 * estimate.probes


@pytest.mark.parametrize(
    ("probes_min", "probes_max", "rel_tol"), [(1, 10, 0.1), (5, 4, 0.1), (2, 4, -1)]
)
def test_bad_settings_are_rejected(probes_min: int, probes_max: int, rel_tol: float) -> None:
    with pytest.raises(ConfigError):
        hutchinson(lambda z: z, (3,), probes_min, probes_max, rel_tol)
