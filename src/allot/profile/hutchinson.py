"""Hutchinson estimates of the trace and the diagonal of a symmetric operator from matvecs.

With Rademacher probes z (entries +-1 with equal probability), E[z' A z] = tr(A) and
E[z * (A z)] = diag(A). Probes are drawn one at a time; the standard errors are the sample standard
deviations over probes divided by sqrt(probes). Drawing stops once the trace's standard error is at
most `rel_tol` times the trace's magnitude (after at least `probes_min` probes), or at `probes_max`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allot.exceptions import ConfigError


@dataclass(frozen=True)
class Estimate:
    """Hutchinson estimates, in the operator's units (for a Hessian: loss units per squared weight).

    `diagonal` and `diagonal_stderr` have the probe shape, float64, on the CPU. `converged` says
    whether the stopping rule was met before `probes_max`.
    """

    trace: float
    trace_stderr: float
    diagonal: Tensor
    diagonal_stderr: Tensor
    probes: int
    converged: bool


def hutchinson(
    matvec: Callable[[Tensor], Tensor],
    shape: Sequence[int],
    probes_min: int = 8,
    probes_max: int = 256,
    rel_tol: float = 0.05,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Estimate tr(A) and diag(A) of the operator `matvec` acting on float64 tensors of `shape`.

    `rel_tol` is the target standard error of the trace relative to |trace|. Probes come from
    `generator` (CPU), so a seeded generator makes the result deterministic.
    """
    if probes_min < 2:
        raise ConfigError(f"probes_min must be at least 2 to estimate an error, got {probes_min}")
    if probes_max < probes_min:
        raise ConfigError(f"probes_max ({probes_max}) must be at least probes_min ({probes_min})")
    if rel_tol < 0:
        raise ConfigError(f"rel_tol must be non-negative, got {rel_tol}")
    shape = tuple(shape)
    # Welford's running mean and sum of squared deviations: stable when the spread is tiny.
    trace_mean, trace_m2 = 0.0, 0.0
    diag_mean = torch.zeros(shape, dtype=torch.float64)
    diag_m2 = torch.zeros(shape, dtype=torch.float64)
    converged = False
    probes = 0
    while probes < probes_max:
        z = torch.randint(0, 2, shape, generator=generator, dtype=torch.float64) * 2 - 1
        sample = z * matvec(z).to(dtype=torch.float64, device="cpu")
        probes += 1
        trace_sample = float(sample.sum())
        delta = trace_sample - trace_mean
        trace_mean += delta / probes
        trace_m2 += delta * (trace_sample - trace_mean)
        diag_delta = sample - diag_mean
        diag_mean += diag_delta / probes
        diag_m2 += diag_delta * (sample - diag_mean)
        if probes >= probes_min and _stderr(trace_m2, probes) <= rel_tol * abs(trace_mean):
            converged = True
            break
    return Estimate(
        trace=trace_mean,
        trace_stderr=_stderr(trace_m2, probes),
        diagonal=diag_mean,
        diagonal_stderr=(diag_m2 / ((probes - 1) * probes)).sqrt(),
        probes=probes,
        converged=converged,
    )


def _stderr(m2: float, probes: int) -> float:
    """Standard error of a mean from Welford's sum of squared deviations."""
    return (m2 / ((probes - 1) * probes)) ** 0.5
