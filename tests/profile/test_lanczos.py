"""Lanczos eigenpairs against numpy.linalg.eigh."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.exceptions import ConfigError
from allot.profile.hvp import Curvature
from allot.profile.lanczos import lanczos


def with_spectrum(values: list[float], seed: int) -> Tensor:
    """A dense symmetric matrix with the given eigenvalues in a random orthonormal basis."""
    generator = torch.Generator().manual_seed(seed)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def check_pairs(a: Tensor, values: Tensor, vectors: Tensor, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-6 * scale)
    residual = a @ vectors - vectors * values
    assert float(residual.norm(dim=0).max()) <= 1e-5 * scale
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(len(values), dtype=torch.float64))


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_exact_when_iterations_cover_the_space(which: str) -> None:
    a = torch.randn(12, 12, dtype=torch.float64)
    a = a + a.T  # indefinite
    values, vectors = lanczos(lambda v: a @ v, 12, 3, 40, which, torch.Generator().manual_seed(0))
    exact = np.linalg.eigh(a.numpy())[0]
    expected = {"largest": exact[-3:], "smallest": exact[:3], "both": np.r_[exact[:3], exact[-3:]]}
    check_pairs(a, values, vectors, np.sort(expected[which])[::-1])


def test_top_and_negative_eigenvalues_converge_in_few_iterations() -> None:
    spectrum = [100.0, 60.0, 30.0, *np.linspace(-1, 1, 194), -20.0, -45.0, -80.0]
    a = with_spectrum(spectrum, seed=1)
    exact = np.linalg.eigh(a.numpy())[0]
    generator = torch.Generator().manual_seed(0)
    values, vectors = lanczos(lambda v: a @ v, 200, 3, 40, "largest", generator)
    check_pairs(a, values, vectors, exact[::-1][:3])
    values, vectors = lanczos(lambda v: a @ v, 200, 3, 40, "smallest", generator)
    check_pairs(a, values, vectors, exact[:3][::-1])


def test_a_low_rank_operator_restarts_and_stays_exact() -> None:
    a = with_spectrum([5.0, -2.0, 1.0] + [0.0] * 9, seed=2)  # invariant Krylov space of size 3
    values, vectors = lanczos(lambda v: a @ v, 12, 4, 12, "both", torch.Generator().manual_seed(0))
    exact = np.linalg.eigh(a.numpy())[0]
    check_pairs(a, values, vectors, np.r_[exact[:4], exact[-4:]][::-1])


def test_the_same_seed_gives_the_same_pairs() -> None:
    a = with_spectrum(list(np.linspace(-3, 10, 50)), seed=3)
    runs = [
        lanczos(lambda v: a @ v, 50, 2, 10, "both", torch.Generator().manual_seed(5)) for _ in "ab"
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


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
    curvature = Curvature(model, ["0"], batches, F.cross_entropy)

    def matvec(v: Tensor) -> Tensor:
        return curvature.layer_hvp("0", v.view(curvature.shape("0"))).flatten()

    values, vectors = lanczos(matvec, 24, 3, 24, "both", torch.Generator().manual_seed(0))
    check_pairs(hessian, values, vectors, np.r_[exact[:3], exact[-3:]][::-1])
    assert curvature.passes.fb_equivalents == 2 * 24


@pytest.mark.parametrize(
    ("k", "iterations", "which"),
    [(0, 5, "largest"), (6, 10, "largest"), (3, 2, "both"), (1, 5, "top")],
)
def test_bad_settings_are_rejected(k: int, iterations: int, which: str) -> None:
    with pytest.raises(ConfigError):
        lanczos(lambda v: v, 5, k, iterations, which)  # type: ignore[arg-type]
