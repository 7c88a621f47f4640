"""Lanczos eigenpairs against numpy.linalg.eigh."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hessians import pairs
from torch import Tensor, nn

from allot.exceptions import ConfigError
from allot.profile.hvp import Curvature
from allot.profile.lanczos import Lanczos, RitzPairs, lanczos


def with_spectrum(values: list[float], seed: int) -> Tensor:
    """A dense symmetric matrix with the given eigenvalues in a random orthonormal basis."""
    generator = torch.Generator().manual_seed(seed)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def check_pairs(a: Tensor, pairs: RitzPairs, expected: np.ndarray) -> None:
    values, vectors = pairs.values, pairs.vectors
    assert float(pairs.residuals.max()) <= 1e-6 * float(np.abs(expected).max())
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-6 * scale)
    residual = a @ vectors - vectors * values
    assert float(residual.norm(dim=0).max()) <= 1e-5 * scale
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(len(values), dtype=torch.float64))


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_exact_when_iterations_cover_the_space(which: str) -> None:
    a = torch.randn(12, 12, dtype=torch.float64)
    a = a + a.T  # indefinite
    pairs = lanczos(lambda v: a @ v, 12, 3, 40, which, torch.Generator().manual_seed(0))
    exact = np.linalg.eigh(a.numpy())[0]
    expected = {"largest": exact[-3:], "smallest": exact[:3], "both": np.r_[exact[:3], exact[-3:]]}
    check_pairs(a, pairs, np.sort(expected[which])[::-1])


def test_top_and_negative_eigenvalues_converge_in_few_iterations() -> None:
    spectrum = [100.0, 60.0, 30.0, *np.linspace(-1, 1, 194), -20.0, -45.0, -80.0]
    a = with_spectrum(spectrum, seed=1)
    exact = np.linalg.eigh(a.numpy())[0]
    generator = torch.Generator().manual_seed(0)
    pairs = lanczos(lambda v: a @ v, 200, 3, 40, "largest", generator)
    check_pairs(a, pairs, exact[::-1][:3])
    pairs = lanczos(lambda v: a @ v, 200, 3, 40, "smallest", generator)
    check_pairs(a, pairs, exact[:3][::-1])


def test_a_low_rank_operator_restarts_and_stays_exact() -> None:
    a = with_spectrum([5.0, -2.0, 1.0] + [0.0] * 9, seed=2)  # invariant Krylov space of size 3
    pairs = lanczos(lambda v: a @ v, 12, 4, 12, "both", torch.Generator().manual_seed(0))
    exact = np.linalg.eigh(a.numpy())[0]
    check_pairs(a, pairs, np.r_[exact[:4], exact[-4:]][::-1])


def test_the_same_seed_gives_the_same_pairs() -> None:
    a = with_spectrum(list(np.linspace(-3, 10, 50)), seed=3)
    runs = [
        lanczos(lambda v: a @ v, 50, 2, 10, "both", torch.Generator().manual_seed(5)) for _ in "ab"
    ]
    assert torch.equal(runs[0].values, runs[1].values)
    assert torch.equal(runs[0].vectors, runs[1].vectors)


def test_indefinite_layer_hessian_through_hvps() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [
        (2 * torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3, 4)
    ]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(w: Tensor) -> Tensor:
        return F.cross_entropy(model[2](torch.tanh(F.linear(x, w, model[0].bias))), y)

    hessian = (
        torch.autograd.functional.hessian(loss, model[0].weight.detach()).view(24, 24).detach()
    )
    exact = np.linalg.eigh(hessian.numpy())[0]
    assert exact[0] < 0  # a saddle: the layer's Hessian block is indefinite
    curvature = Curvature(model, ["0"], pairs(batches))

    def matvec(v: Tensor) -> Tensor:
        return curvature.layer_hvp("0", v.view(curvature.shape("0"))).flatten()

    ritz = lanczos(matvec, 24, 3, 24, "both", torch.Generator().manual_seed(0))
    check_pairs(hessian, ritz, np.r_[exact[:3], exact[-3:]][::-1])
    assert curvature.passes.fb_equivalents == 2 * 24


def test_residual_bounds_are_the_true_residuals_and_bound_the_error() -> None:
    a = with_spectrum(list(np.linspace(-5, 10, 60)), seed=4)
    pairs = lanczos(lambda v: a @ v, 60, 2, 6, "both", torch.Generator().manual_seed(1))
    measured = (a @ pairs.vectors - pairs.vectors * pairs.values).norm(dim=0)
    torch.testing.assert_close(pairs.residuals, measured, rtol=1e-6, atol=1e-9)
    exact = torch.tensor(np.linalg.eigh(a.numpy())[0])
    nearest = (pairs.values[:, None] - exact[None, :]).abs().min(dim=1).values
    assert (nearest <= pairs.residuals + 1e-12).all()
    assert float(pairs.residuals.max()) > 1e-3  # six iterations are not enough to converge


def test_runs_driven_in_lock_step_equal_separate_runs() -> None:
    mats = [with_spectrum(list(np.linspace(-1, s, 30)), seed=s) for s in (5, 6)]
    runs = [Lanczos(30, 8, torch.Generator().manual_seed(i)) for i in range(2)]
    while not all(run.done for run in runs):
        for run, a in zip(runs, mats, strict=True):
            run.update(a @ run.query())
    for i, (run, a) in enumerate(zip(runs, mats, strict=True)):
        alone = lanczos(lambda v, a=a: a @ v, 30, 2, 8, "largest", torch.Generator().manual_seed(i))
        assert torch.equal(run.pairs(2).values, alone.values)
    with pytest.raises(ConfigError, match="done"):
        runs[0].update(torch.zeros(30))


@pytest.mark.parametrize(
    ("k", "iterations", "which"),
    [(0, 5, "largest"), (6, 10, "largest"), (3, 2, "both"), (1, 5, "top")],
)
def test_bad_settings_are_rejected(k: int, iterations: int, which: str) -> None:
    with pytest.raises(ConfigError):
        lanczos(lambda v: v, 5, k, iterations, which)  # type: ignore[arg-type]


def test_krylov_gives_the_exact_products_of_its_ritz_vectors() -> None:
    a = with_spectrum([9.0, 7.0, -5.0] + [0.1 * i for i in range(17)], seed=6)
    run = Lanczos(20, 5, torch.Generator().manual_seed(0))
    while not run.done:
        run.update(a @ run.query())
    krylov = run.krylov()
    v = krylov.vectors
    assert v.shape == (20, 5) and not krylov.next.eq(0).all()
    torch.testing.assert_close(v.T @ v, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(v.T @ krylov.next, torch.zeros(5, dtype=torch.float64))
    # A V = V diag(values) + next coefficients', so tr(V'AV) and diag(A V V') need no products
    torch.testing.assert_close(
        a @ v, v * krylov.values + torch.outer(krylov.next, krylov.coefficients)
    )
    assert krylov.trace() == pytest.approx(float((v.T @ a @ v).trace()), rel=1e-12)
    torch.testing.assert_close(krylov.diagonal(), (a @ v @ v.T).diagonal())
    x = torch.randn(20, dtype=torch.float64)
    torch.testing.assert_close(krylov.deflate(x), x - v @ (v.T @ x))
    assert torch.equal(run.pairs(2, "both").values, krylov.values[[0, 1, 3, 4]])


def test_an_invariant_krylov_space_has_no_residual_direction() -> None:
    a = with_spectrum([3.0, 2.0, 1.0, -1.0], seed=2)
    run = Lanczos(4, 4, torch.Generator().manual_seed(0))
    while not run.done:
        run.update(a @ run.query())
    krylov = run.krylov()
    assert krylov.next.eq(0).all()
    torch.testing.assert_close(krylov.diagonal(), a.diagonal())
    assert krylov.trace() == pytest.approx(5.0, rel=1e-12)
