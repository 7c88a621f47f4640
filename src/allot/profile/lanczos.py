"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

Each iteration costs one matvec. Every new Lanczos vector is orthogonalised against the whole basis
(classical Gram-Schmidt, twice), so the basis stays orthonormal to rounding and no spurious copies
of converged eigenvalues appear. If the Krylov space becomes invariant before `iterations`, the
process restarts from a fresh random vector orthogonal to the basis; with `iterations >= n` the
basis then spans the whole space and the eigenpairs are exact (up to rounding). All arithmetic is
float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from allot.exceptions import ConfigError

Which = Literal["largest", "smallest", "both"]

# A residual below this fraction of the operator's scale means the Krylov space is invariant.
_BREAKDOWN = 1e-10


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    iterations: int,
    which: Which = "largest",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Ritz approximations of k extreme eigenpairs of the symmetric operator `matvec` on R^n.

    `which` picks the k largest, the k smallest (most negative) or both (up to 2k pairs).
    Returns (eigenvalues, eigenvectors): eigenvalues float64 of shape (r,) in decreasing order,
    eigenvectors float64 of shape (n, r) with orthonormal columns, column j belonging to
    eigenvalue j. Uses min(iterations, n) matvecs; the start vector comes from `generator`.
    """
    if which not in ("largest", "smallest", "both"):
        raise ConfigError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and n={n}, got {k}")
    if iterations < k:
        raise ConfigError(f"iterations ({iterations}) must be at least k ({k})")
    m = min(iterations, n)
    basis = torch.zeros(m, n, dtype=torch.float64)
    alpha = torch.zeros(m, dtype=torch.float64)
    beta = torch.zeros(max(m - 1, 0), dtype=torch.float64)
    scale = 0.0
    q = _random_orthogonal(n, basis[:0], generator)
    for j in range(m):
        basis[j] = q
        w = matvec(q).to(dtype=torch.float64, device="cpu").reshape(n)
        alpha[j] = q @ w
        w = _orthogonalise(w, basis[: j + 1])
        if j == m - 1:
            break
        norm = float(w.norm())
        scale = max(scale, abs(float(alpha[j])), norm)
        if norm <= _BREAKDOWN * scale:
            q = _random_orthogonal(n, basis[: j + 1], generator)  # beta[j] stays 0
        else:
            beta[j] = norm
            q = w / norm
    tridiagonal = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)  # ascending
    if which == "largest":
        index = torch.arange(m - k, m)
    elif which == "smallest":
        index = torch.arange(0, k)
    else:
        index = torch.cat([torch.arange(0, k), torch.arange(max(k, m - k), m)])
    index = index.flip(0)
    return values[index], basis.T @ vectors[:, index]


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of w along the (orthonormal) rows of basis; twice is enough."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _random_orthogonal(n: int, basis: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random unit vector orthogonal to the rows of basis (which span less than R^n)."""
    w = _orthogonalise(torch.randn(n, dtype=torch.float64, generator=generator), basis)
    return w / w.norm()
