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
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from allot.exceptions import ConfigError

Which = Literal["largest", "smallest", "both"]

# A residual below this fraction of the operator's scale means the Krylov space is invariant.
_BREAKDOWN = 1e-10


@dataclass(frozen=True)
class RitzPairs:
    """Ritz approximations: `values` (r,) decreasing, `vectors` (n, r) orthonormal columns, and
    `residuals` (r,): |A x - theta x| for each pair, the Lanczos bound |beta_m s_m| (0 when exact).
    Every eigenvalue-estimate error is at most its residual, so it says how far to trust each one."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor

    @property
    def saddle(self) -> bool:
        """Whether the matrix certainly has a negative eigenvalue: the smallest Ritz value is below
        minus its residual bound by more than rounding (`SADDLE_TOLERANCE` of the largest |value|),
        so a semidefinite matrix whose smallest eigenvalue is zero up to rounding is no saddle."""
        return is_saddle(
            float(self.values.min()),
            float(self.residuals[int(self.values.argmin())]),
            float(self.values.abs().max()),
        )


SADDLE_TOLERANCE = 1e-6
"""Relative size, against the largest |eigenvalue|, of what counts as zero up to rounding."""


def is_saddle(smallest: float, residual: float, largest: float) -> bool:
    """True when an eigenvalue estimate `smallest` with error bound `residual` is certainly
    negative, beyond `SADDLE_TOLERANCE` of the magnitude `largest`."""
    return smallest + residual < -SADDLE_TOLERANCE * abs(largest)


class Lanczos:
    """One Lanczos run driven one matvec at a time: `query()` is the next vector to multiply,
    `update(A q)` consumes the product. Several runs (one per layer) can so share each pass over
    the data. `done` once min(iterations, n) products have been consumed; then `pairs(k, which)`."""

    def __init__(self, n: int, iterations: int, generator: torch.Generator | None = None) -> None:
        if n < 1 or iterations < 1:
            raise ConfigError(f"n ({n}) and iterations ({iterations}) must be at least 1")
        self.n, self.m = n, min(iterations, n)
        self._generator = generator
        self._basis = torch.zeros(self.m, n, dtype=torch.float64)
        self._alpha = torch.zeros(self.m, dtype=torch.float64)
        self._beta = torch.zeros(self.m, dtype=torch.float64)  # beta[m-1]: the residual's norm
        self._scale = 0.0
        self._steps = 0
        self._q = _random_orthogonal(n, self._basis[:0], generator)

    @property
    def done(self) -> bool:
        return self._steps == self.m

    def query(self) -> Tensor:
        """The unit vector (float64, shape (n,)) whose product the next `update` expects."""
        return self._q

    def update(self, product: Tensor) -> None:
        """Consume A q for the vector `query()` returned."""
        if self.done:
            raise ConfigError("this Lanczos run is done; read its pairs")
        j = self._steps
        self._basis[j] = self._q
        w = product.to(dtype=torch.float64, device="cpu").reshape(self.n)
        self._alpha[j] = self._q @ w
        w = _orthogonalise(w, self._basis[: j + 1])
        norm = float(w.norm())
        self._scale = max(self._scale, abs(float(self._alpha[j])), norm)
        self._steps += 1
        invariant = norm <= _BREAKDOWN * self._scale
        if not invariant:
            self._beta[j] = norm
            self._q = w / norm
        elif not self.done:
            self._q = _random_orthogonal(self.n, self._basis[: j + 1], self._generator)

    def krylov(self) -> Krylov:
        """Every Ritz pair of the iterations done so far, with the residual direction."""
        m = self._steps
        if m == 0:
            raise ConfigError("no Lanczos iteration has been done yet")
        beta = self._beta[: m - 1]
        tridiagonal = torch.diag(self._alpha[:m]) + torch.diag(beta, 1) + torch.diag(beta, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)  # ascending
        order = torch.arange(m - 1, -1, -1)
        return Krylov(
            values=values[order],
            vectors=self._basis[:m].T @ vectors[:, order],
            coefficients=self._beta[m - 1] * vectors[m - 1, order],
            next=self._q if self._beta[m - 1] > 0 else torch.zeros(self.n, dtype=torch.float64),
        )

    def pairs(self, k: int, which: Which = "largest") -> RitzPairs:
        """The k extreme Ritz pairs (`which`: largest, smallest, or both: up to 2k pairs)."""
        return self.krylov().pairs(k, which)


@dataclass(frozen=True)
class Krylov:
    """All m Ritz pairs of a Lanczos run and what they give exactly: with V the Ritz vectors
    (n, m, orthonormal columns), A V = V diag(values) + next coefficients', where `next` is the
    unit residual direction orthogonal to V (zero once the Krylov space is invariant).

    So V'AV = diag(values), and for the projector P = V V' the parts tr(P A P) = sum(values) and
    diag(A P) are known without further products: deflated Hutchinson estimates only the rest.
    """

    values: Tensor
    vectors: Tensor
    coefficients: Tensor
    next: Tensor

    def pairs(self, k: int, which: Which = "largest") -> RitzPairs:
        """The k extreme Ritz pairs (`which`: largest, smallest, or both: up to 2k pairs)."""
        if which not in ("largest", "smallest", "both"):
            raise ConfigError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
        m = len(self.values)
        if not 1 <= k <= m:
            raise ConfigError(f"k must be between 1 and the {m} iterations done, got {k}")
        if which == "largest":
            index = torch.arange(0, k)
        elif which == "smallest":
            index = torch.arange(m - k, m)
        else:
            index = torch.cat([torch.arange(0, min(k, m - k)), torch.arange(m - k, m)])
        return RitzPairs(
            values=self.values[index],
            vectors=self.vectors[:, index],
            residuals=self.coefficients[index].abs(),
        )

    def deflate(self, x: Tensor) -> Tensor:
        """(I - P) x for a flat float64 x of length n."""
        return x - self.vectors @ (self.vectors.T @ x)

    def trace(self) -> float:
        """tr(P A P) = tr(V'AV), the part of tr(A) inside the Krylov space."""
        return float(self.values.sum())

    def diagonal(self) -> Tensor:
        """diag(A P) = sum_k (A v_k) * v_k, shape (n,)."""
        products = self.vectors * self.values + self.next[:, None] * self.coefficients
        return (products * self.vectors).sum(1)


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    iterations: int,
    which: Which = "largest",
    generator: torch.Generator | None = None,
) -> RitzPairs:
    """Ritz approximations of k extreme eigenpairs of the symmetric operator `matvec` on R^n.

    `which` picks the k largest, the k smallest (most negative) or both (up to 2k pairs). Uses
    min(iterations, n) matvecs; the start vector comes from `generator`.
    """
    if which not in ("largest", "smallest", "both"):
        raise ConfigError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and n={n}, got {k}")
    if iterations < k:
        raise ConfigError(f"iterations ({iterations}) must be at least k ({k})")
    run = Lanczos(n, iterations, generator)
    while not run.done:
        run.update(matvec(run.query()))
    return run.pairs(k, which)


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of w along the (orthonormal) rows of basis; twice is enough."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _random_orthogonal(n: int, basis: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random unit vector orthogonal to the rows of basis (which span less than R^n)."""
    w = _orthogonalise(torch.randn(n, dtype=torch.float64, generator=generator), basis)
    return w / w.norm()
