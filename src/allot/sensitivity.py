"""Per-layer sensitivity: how much curvature each layer sits in and what each candidate would cost.

For every compressible layer of a prepared (BatchNorm-folded) model: the gradient norm |g_i|, the
Hutchinson trace of H_ii (with its standard error), the largest and the most negative Lanczos
eigenvalues of H_ii (with residual bounds; a layer whose smallest eigenvalue is below minus its
bound sits at a saddle), and every grid candidate's storage and predicted damage under an error
model. Curvature is in calibration-loss units per squared weight unit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from allot.candidates import Grid, score_candidates
from allot.errors import get_error_model
from allot.profile.engine import Profile
from allot.profile.lanczos import is_saddle
from allot.resources import peak_memory


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's row; `candidates` maps a scheme label to (bits per weight, predicted damage)."""

    name: str
    weights: int
    gradient_norm: float
    trace: float
    trace_stderr: float
    top_eigenvalue: float
    top_residual: float
    bottom_eigenvalue: float
    bottom_residual: float
    candidates: dict[str, tuple[float, float]]

    @property
    def saddle(self) -> bool:
        """True when H_ii certainly has a negative eigenvalue (`allot.profile.lanczos.is_saddle`)."""
        return is_saddle(self.bottom_eigenvalue, self.bottom_residual, self.top_eigenvalue)


@dataclass(frozen=True)
class Sensitivity:
    """The whole analysis, with its cost: forward+backward equivalents over the calibration set
    (see `allot.profile.hvp.Passes`), wall-clock seconds, and the process's peak resident memory
    in bytes when it ended (`allot.resources.peak_memory`)."""

    error_model: str
    layers: list[LayerSensitivity]
    fb_equivalents: int
    seconds: float
    peak_memory_bytes: int

    def to_json(self) -> dict:
        return {
            "error_model": self.error_model,
            "fb_equivalents": self.fb_equivalents,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "layers": [{**asdict(row), "saddle": row.saddle} for row in self.layers],
        }


def analyze(profile: Profile, grid: Grid, error_model: str, progress: bool = True) -> Sensitivity:
    """Every layer's curvature summary and every grid candidate's predicted damage."""
    start = time.perf_counter()
    table = score_candidates(
        profile.model, profile.layers, grid, get_error_model(error_model), profile, progress
    )
    estimates = profile.hessian_estimates()
    eigenpairs = profile.eigenpairs()
    rows = []
    for layer, candidates in zip(table.layers, table.candidates, strict=True):
        pairs = eigenpairs[layer.name]
        rows.append(
            LayerSensitivity(
                name=layer.name,
                weights=layer.spec.numel,
                gradient_norm=float(profile.gradient(layer.name).double().norm()),
                trace=estimates[layer.name].trace,
                trace_stderr=estimates[layer.name].trace_stderr,
                top_eigenvalue=float(pairs.values[0]),
                top_residual=float(pairs.residuals[0]),
                bottom_eigenvalue=float(pairs.values[-1]),
                bottom_residual=float(pairs.residuals[-1]),
                candidates={
                    c.scheme.label(): (c.cost_bits / layer.spec.numel, c.damage) for c in candidates
                },
            )
        )
    return Sensitivity(
        error_model,
        rows,
        profile.curvature.passes.fb_equivalents,
        time.perf_counter() - start,
        peak_memory(),
    )
