"""Steered quantization: grids and codes chosen to move a layer's error out of the directions its
Hessian curves most in, instead of minimising the plain weight error (CET's major-axis steering;
the reconstruction, and what was measured on the way to it, is in docs/cet.md).

The layer Hessian is modelled as H_ii ~ B (x) M with M = X X' / N the mean input second moment
(exact, from the profile) and B diagonal over output rows. Under that model the quadratic part of
the loss change, 1/2 d'H_ii d, is a positively weighted sum over rows of d_r' M d_r, so every row
minimises its own

    f_r(d_r) = d_r' M d_r

whatever its weight. M's large eigen-directions are those along which the inputs vary most;
steering moves rounding error into directions the inputs hardly excite (the major axes of the
quadric). The gradient term g.d is left to the allocator's exact damage: steering on it too,
with the output-side scale taken from the Hutchinson trace, pushed weights along -g into
directions where the real curvature is far above the model's and raised the measured loss up to
100-fold (docs/cet.md).

Per row, in three steps, each judged by f:
1. grid: the clipping of the min-max range (scales and offsets) from `CLIPS` whose
   round-to-nearest codes give the lowest f;
2. rounding: sequential rounding over the columns, each column's rounding error compensated on the
   columns not yet rounded through the Cholesky factor of M^-1 (the optimal brain quantizer /
   GPTQ update);
3. refinement: coordinate descent over codes +-1 on f, a few sweeps.
Each row finally keeps whichever of the steered and the round-to-nearest codes has the lower f, so
steering never predicts more damage than round-to-nearest on the same grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.profile.activations import damped_cholesky
from allot.schemes.grid import grid_levels, quant_grid, round_to_grid
from allot.stats import LayerStats

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
SWEEPS = 4
DAMPING = 0.01


def steer(
    weight_2d: Tensor, bits: int, groups: int, stats: LayerStats
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Steered `(codes, scale, offset)` of a folded (out, fan_in) weight, in the stored form of
    `QuantizedLayer` (as `quantize_rtn` returns them), with `groups` scale groups per row and
    `stats` the layer's calibration input statistics."""
    out, fan_in = weight_2d.shape
    w = weight_2d.detach().double()
    objective = _Objective(stats.input_cov.double() / stats.samples)

    grouped = w.reshape(out, groups, -1)
    rtn, scale, offset, rtn_value = _round_on(grouped, bits, CLIPS[0], objective, w)
    for clip in CLIPS[1:]:
        codes, clip_scale, clip_offset, value = _round_on(grouped, bits, clip, objective, w)
        better = value < rtn_value
        rtn = torch.where(better[:, None], codes, rtn)
        scale = torch.where(better[:, None], clip_scale, scale)
        if offset is not None and clip_offset is not None:
            offset = torch.where(better[:, None], clip_offset, offset)
        rtn_value = torch.where(better, value, rtn_value)

    low, step = (
        t.repeat_interleave(fan_in // groups, dim=1) for t in grid_levels(bits, scale, offset)
    )
    levels = 1 if bits == 1 else 2**bits - 1
    codes = _sequential(w, low, step, levels, objective.second)
    codes = _refine(codes, w, low, step, levels, objective)
    keep_rtn = rtn_value <= objective(low + step * codes - w)
    return torch.where(keep_rtn[:, None], rtn, codes.to(torch.int64)), scale, offset


def _round_on(
    grouped: Tensor, bits: int, clip: float, objective: _Objective, w: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Round-to-nearest codes (out, fan_in) on the grid clipped by `clip`, the grid, and f."""
    scale, offset = quant_grid(grouped, bits, clip)
    codes = round_to_grid(grouped, bits, scale, offset).reshape(w.shape)
    return codes, scale, offset, objective(_dequantize(codes, bits, scale, offset) - w)


class _Objective:
    """f_r(d) = d_r' M d_r for every row of d at once, float64."""

    def __init__(self, second: Tensor) -> None:
        self.second = second

    def __call__(self, delta: Tensor) -> Tensor:
        return ((delta @ self.second) * delta).sum(1)


def _dequantize(codes: Tensor, bits: int, scale: Tensor, offset: Tensor | None) -> Tensor:
    out, fan_in = codes.shape
    low, step = grid_levels(bits, scale, offset)
    return (low[..., None] + step[..., None] * codes.reshape(out, low.shape[1], -1)).reshape(
        out, fan_in
    )


def _sequential(w: Tensor, low: Tensor, step: Tensor, levels: int, second: Tensor) -> Tensor:
    """Codes (float64, out x fan_in) rounded column by column, each column's error spread over the
    later columns so as to minimise sum_r d_r' M d_r (M damped to be invertible)."""
    factor, _ = damped_cholesky(LayerStats(second, 1), DAMPING)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    target = w.clone()
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        q = _nearest(target[:, j], low[:, j], step[:, j], levels)
        codes[:, j] = q
        error = (target[:, j] - (low[:, j] + step[:, j] * q)) / upper[j, j]
        target[:, j + 1 :] -= error[:, None] * upper[j, j + 1 :]
    return codes


def _nearest(x: Tensor, low: Tensor, step: Tensor, levels: int) -> Tensor:
    varying = step > 0
    q = torch.round((x - low) / torch.where(varying, step, 1.0))
    return torch.where(varying, q, 0.0).clamp(0, levels)


def _refine(
    codes: Tensor, w: Tensor, low: Tensor, step: Tensor, levels: int, objective: _Objective
) -> Tensor:
    """Coordinate descent on f over codes +-1, column by column, until a sweep changes nothing
    (at most `SWEEPS` sweeps)."""
    codes = codes.clone()
    delta = low + step * codes - w
    product = delta @ objective.second  # (d M) row by row, kept up to date
    diagonal = objective.second.diagonal()
    for _ in range(SWEEPS):
        changed = False
        for j in range(w.shape[1]):
            best_gain = torch.zeros_like(step[:, j])
            best_move = torch.zeros_like(step[:, j])
            for move in (1.0, -1.0):
                target = codes[:, j] + move
                allowed = (target >= 0) & (target <= levels) & (step[:, j] > 0)
                shift = move * step[:, j]
                gain = 2 * shift * product[:, j] + shift**2 * diagonal[j]
                better = allowed & (gain < best_gain)
                best_gain = torch.where(better, gain, best_gain)
                best_move = torch.where(better, move, best_move)
            if bool(best_move.any()):
                changed = True
                codes[:, j] += best_move
                shift = best_move * step[:, j]
                product += shift[:, None] * objective.second[j]
        if not changed:
            break
    return codes
