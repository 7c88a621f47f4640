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

With `refit` (error feedback asks for it), `REFITS` more rounds follow, each kept by a row only if
it lowers f:
4. grid re-fit: with the codes fixed, f is quadratic in the row's offsets and scales, so they are
   solved for exactly (least squares under M), then stored as float16;
5. refinement (step 3) on the re-fitted grid.
Steps 1-3 choose the grid by its round-to-nearest codes; at 2 bits the best grid for the steered
codes is far from it (on ResNet-20 the re-fit lowers the calibration loss of error feedback's 2-bit
model from 0.0071 to 0.0060). Scaled-sign grids (1 bit) are not re-fitted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.profile.activations import damped_cholesky
from allot.schemes.grid import grid_levels, quant_grid, round_to_grid
from allot.stats import LayerStats

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
SWEEPS = 4
REFITS = 2
DAMPING = 0.01


def steer(
    weight_2d: Tensor, bits: int, groups: int, stats: LayerStats, refit: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Steered `(codes, scale, offset)` of a folded (out, fan_in) weight, in the stored form of
    `QuantizedLayer` (as `quantize_rtn` returns them), with `groups` scale groups per row and
    `stats` the layer's calibration input statistics; `refit` re-fits the grid to the codes."""
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

    low, step = _per_weight(bits, scale, offset, fan_in)
    levels = 1 if bits == 1 else 2**bits - 1
    codes = _sequential(w, low, step, levels, objective.second)
    codes = _refine(codes, w, low, step, levels, objective)
    keep_rtn = rtn_value <= objective(low + step * codes - w)
    codes = torch.where(keep_rtn[:, None], rtn, codes.to(torch.int64))
    if refit and offset is not None:
        codes, scale, offset = _refit(codes, w, bits, scale, offset, objective)
    return codes, scale, offset


def _refit(
    codes: Tensor, w: Tensor, bits: int, scale: Tensor, offset: Tensor, objective: _Objective
) -> tuple[Tensor, Tensor, Tensor]:
    """`REFITS` rounds of grid least squares then code refinement; a row takes a round's
    `(codes, scale, offset)` only if they lower its f."""
    value = objective(_dequantize(codes, bits, scale, offset) - w)
    for _ in range(REFITS):
        fitted_offset, fitted_scale = grid_least_squares(
            codes.double(), w, scale.shape[1], objective.second
        )
        usable = (
            torch.isfinite(fitted_scale) & (fitted_scale > 0) & torch.isfinite(fitted_offset)
        ).all(1)
        new_scale = torch.where(usable[:, None], fitted_scale, scale)
        new_offset = torch.where(usable[:, None], fitted_offset, offset)
        low, step = _per_weight(bits, new_scale, new_offset, w.shape[1])
        new_codes = _refine(codes.double(), w, low, step, 2**bits - 1, objective).to(torch.int64)
        new_value = objective(_dequantize(new_codes, bits, new_scale, new_offset) - w)
        better = new_value < value
        codes = torch.where(better[:, None], new_codes, codes)
        scale = torch.where(better[:, None], new_scale, scale)
        offset = torch.where(better[:, None], new_offset, offset)
        value = torch.where(better, new_value, value)
    return codes, scale, offset


def grid_least_squares(
    codes: Tensor, w: Tensor, groups: int, second: Tensor
) -> tuple[Tensor, Tensor]:
    """Float16 `(offset, scale)` (out, groups) minimising every row's f_r(d) = d_r' M d_r with
    d = offset_g + scale_g * codes - w on each group g, the codes fixed (all float64 in; M =
    `second`, fan_in x fan_in). A row whose system is singular or whose solution does not fit
    float16 gets non-finite values, for the caller to reject."""
    out, fan_in = w.shape
    size = fan_in // groups
    grouped = codes.reshape(out, groups, size)
    # Normal equations per row over theta = (offsets, scales): blocks 1'M1, 1'Mc, c'Mc and
    # right-hand sides 1'Mw, c'Mw, group by group, without forming the (out, fan_in, 2 groups)
    # design.
    ones = second.reshape(groups, size, groups, size).sum((1, 3))
    ones_codes = torch.empty(out, groups, groups, dtype=w.dtype)
    codes_codes = torch.empty(out, groups, groups, dtype=w.dtype)
    for h in range(groups):
        product = (grouped[:, h] @ second[h * size : (h + 1) * size]).reshape(out, groups, size)
        ones_codes[:, :, h] = product.sum(-1)
        codes_codes[:, :, h] = (product * grouped).sum(-1)
    weighted = (w @ second).reshape(out, groups, size)
    normal = torch.cat(
        [
            torch.cat([ones.expand(out, groups, groups), ones_codes], 2),
            torch.cat([ones_codes.transpose(1, 2), codes_codes], 2),
        ],
        1,
    )
    right = torch.cat([weighted.sum(-1), (weighted * grouped).sum(-1)], 1)
    theta, info = torch.linalg.solve_ex(normal, right)
    theta = torch.where((info == 0)[:, None], theta, torch.nan).to(torch.float16)
    return theta[:, :groups], theta[:, groups:]


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


def _per_weight(
    bits: int, scale: Tensor, offset: Tensor | None, fan_in: int
) -> tuple[Tensor, Tensor]:
    """The grid's (lowest value, step), float64, repeated to every weight: (out, fan_in)."""
    low, step = grid_levels(bits, scale, offset)
    size = fan_in // low.shape[1]
    return low.repeat_interleave(size, dim=1), step.repeat_interleave(size, dim=1)


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
