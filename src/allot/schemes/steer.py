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
1. grid: the clipping of the min-max range from `CLIPS` whose round-to-nearest codes give the
   lowest f (on the layer's grid kind: float offset, integer zero point, or symmetric);
2. rounding: sequential rounding over the columns, each column's rounding error compensated on the
   columns not yet rounded through the Cholesky factor of M^-1 (the optimal brain quantizer /
   GPTQ update);
3. refinement: coordinate descent over codes +-1 on f, a few sweeps.
Each row finally keeps whichever of the steered and the round-to-nearest codes has the lower f, so
steering never predicts more damage than round-to-nearest on the same grid.

With `refit` (error feedback asks for it), `REFITS` more rounds follow, each kept by a row only if
it lowers f:
4. grid re-fit (`refit_grid`): with the codes fixed, f is quadratic in the row's grid, so it is
   solved for exactly (least squares under M) within the grid's family: offsets and scales
   (float-offset); offsets and scales, then the zero point rounded to the integer nearest
   -offset / scale and the scales solved again with it fixed (zero-point); scales alone with the
   zero point fixed at the midpoint (symmetric); scales and offsets stored as float16;
5. refinement (step 3) on the re-fitted grid.
Steps 1-3 choose the grid by its round-to-nearest codes; at 2 bits the best grid for the steered
codes is far from it (on ResNet-20 the re-fit lowers the calibration loss of error feedback's 2-bit
model from 0.0071 to 0.0060). Scaled-sign grids (1 bit) are not re-fitted.

`steer_many` steers several (bits, groups, grid) settings of one layer at once: they share M, so
steps 2 and 3 run on all of them stacked, every column step one set of tensor operations over all
rows of all settings; later columns take a block's rounding errors (step 2) or code moves (step 3)
once per block of `BLOCK` columns. The results are those of the column-by-column algorithm above up
to float64 rounding (tests/schemes/test_steer_reference.py; docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from allot.modules.quant import FLOAT_OFFSET, ZERO_POINT, QuantGrid
from allot.profile.activations import damped_cholesky
from allot.schemes.grid import quant_grid, round_to_grid
from allot.stats import LayerStats

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
SWEEPS = 4
REFITS = 2
BLOCK = 32
"""Columns per block of the rounding and refinement sweeps (`_sequential`, `_refine`): a
speed setting only, the results are the same for any block up to float64 rounding."""
SPARSE = 0.01
"""Moves per code of a block above which `_refine` adds the block's moves to d M as one dense
product, below which move by move; a speed setting only (measured best near 1 %)."""
STACK = 2**23
"""Most weights (candidates x out x fan_in) rounded and refined together by `steer_many`, which
holds some 16 float64 tensors of that size at once (about 1 GB at 2**23); a speed setting only."""
DAMPING = 0.01


def steer(
    weight_2d: Tensor,
    bits: int,
    groups: int,
    grid: str,
    stats: LayerStats,
    refit: bool = False,
) -> tuple[Tensor, QuantGrid]:
    """Steered codes (int64, (out, fan_in)) of a folded weight and their stored grid of kind
    `grid` (as `quantize_rtn` returns them), with `groups` scale groups per row and `stats` the
    layer's calibration input statistics; `refit` re-fits the grid to the codes."""
    return steer_many(weight_2d, [(bits, groups, grid)], stats, refit)[0]


def steer_many(
    weight_2d: Tensor,
    settings: Sequence[tuple[int, int, str]],
    stats: LayerStats,
    refit: bool = False,
) -> list[tuple[Tensor, QuantGrid]]:
    """`steer` for several `(bits, groups, grid)` settings of one folded weight under the same
    input statistics, in order: each setting gets the codes and grid `steer` gives it alone (up to
    float64 rounding), but the settings share the factorisation of M and are rounded and refined
    together, stacked along a leading candidate dimension (at most `STACK` weights at a time), so
    that each column step is one set of tensor operations for all of them."""
    w = weight_2d.detach().double()
    objective = _Objective(stats.input_cov.double() / stats.samples)
    upper = _inverse_factor(objective.second)
    size = max(1, STACK // w.numel())
    return [
        result
        for first in range(0, len(settings), size)
        for result in _steer_stacked(w, settings[first : first + size], objective, upper, refit)
    ]


def _steer_stacked(
    w: Tensor,
    settings: Sequence[tuple[int, int, str]],
    objective: _Objective,
    upper: Tensor,
    refit: bool,
) -> list[tuple[Tensor, QuantGrid]]:
    """Steps 1-3 (and with `refit` 4-5) for each setting, steps 2 and 3 stacked."""
    nearest = [_best_clip(w, bits, groups, grid, objective) for bits, groups, grid in settings]
    tables = [_per_weight(fitted, w.shape[1]) for _, fitted, _ in nearest]
    low = torch.stack([table[0] for table in tables])
    step = torch.stack([table[1] for table in tables])
    levels = torch.tensor(
        [_levels(bits) for bits, _, _ in settings], dtype=torch.float64, device=w.device
    )
    codes = _sequential(w, low, step, levels, upper)
    codes = _refine(codes, w, low, step, levels, objective)
    results = []
    for (bits, _, _), (rtn, fitted, rtn_value), steered, low_c, step_c in zip(
        settings, nearest, codes, low, step, strict=True
    ):
        keep_rtn = rtn_value <= objective(low_c + step_c * steered - w)
        chosen = torch.where(keep_rtn[:, None], rtn, steered.to(torch.int64))
        if refit and bits > 1:
            chosen, fitted = _refit(chosen, w, fitted, objective)
        results.append((chosen, fitted))
    return results


def _inverse_factor(second: Tensor) -> Tensor:
    """U, the upper Cholesky factor of M^-1 (M = `second` damped by `DAMPING` to be
    invertible): U_jk / U_jj is how much of column j's rounding error column k > j takes."""
    factor, _ = damped_cholesky(LayerStats(second, 1), DAMPING)
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def _best_clip(
    w: Tensor, bits: int, groups: int, grid: str, objective: _Objective
) -> tuple[Tensor, QuantGrid, Tensor]:
    """Step 1: per row, the round-to-nearest codes (out, fan_in), grid and f of the clipping in
    `CLIPS` with the lowest f."""
    grouped = w.reshape(w.shape[0], groups, -1)
    rtn, fitted, rtn_value = _round_on(grouped, bits, CLIPS[0], grid, objective, w)
    for clip in CLIPS[1:]:
        codes, clipped, value = _round_on(grouped, bits, clip, grid, objective, w)
        better = value < rtn_value
        rtn = torch.where(better[:, None], codes, rtn)
        fitted = fitted.select(better, clipped)
        rtn_value = torch.where(better, value, rtn_value)
    return rtn, fitted, rtn_value


def _levels(bits: int) -> int:
    """The highest code of a `bits`-bit grid."""
    return 1 if bits == 1 else 2**bits - 1


def _refit(
    codes: Tensor, w: Tensor, grid: QuantGrid, objective: _Objective
) -> tuple[Tensor, QuantGrid]:
    """`REFITS` rounds of grid least squares then code refinement; a row takes a round's codes
    and grid only if they lower its f."""
    value = objective(_dequantize(codes, grid) - w)
    for _ in range(REFITS):
        new_grid = refit_grid(codes, w, grid, objective.second)
        low, step = _per_weight(new_grid, w.shape[1])
        levels = torch.tensor([_levels(grid.bits)], dtype=torch.float64, device=w.device)
        new_codes = _refine(codes.double()[None], w, low[None], step[None], levels, objective)
        new_codes = new_codes[0].to(torch.int64)
        new_value = objective(_dequantize(new_codes, new_grid) - w)
        better = new_value < value
        codes = torch.where(better[:, None], new_codes, codes)
        grid = grid.select(better, new_grid)
        value = torch.where(better, new_value, value)
    return codes, grid


def refit_grid(codes: Tensor, w: Tensor, grid: QuantGrid, second: Tensor) -> QuantGrid:
    """The grid of `grid`'s kind minimising every row's f_r(d) = d_r' M d_r for the fixed integer
    `codes` (out, fan_in) of the float64 weight `w` (M = `second`): least squares over offsets and
    scales (float-offset); over offsets and scales, then the zero point rounded to the integer
    nearest -offset / scale (clamped to the code range) and the scales solved again with it fixed
    (zero-point); over scales with the zero point fixed at the midpoint (symmetric). Scales and
    offsets are rounded to float16. A row whose system is singular or whose solution is not finite
    or has a scale <= 0 keeps `grid`'s tables."""
    groups = grid.scale.shape[1]
    levels = 2**grid.bits - 1
    codes = codes.double()
    zero = grid.zero_points()
    if grid.kind == FLOAT_OFFSET:
        offset, scale = grid_least_squares(codes, w, groups, second)
        fitted = QuantGrid(grid.bits, grid.kind, scale.to(torch.float16), offset.to(torch.float16))
    else:
        if grid.kind == ZERO_POINT:
            offset, scale = grid_least_squares(codes, w, groups, second)
            ratio = -offset / torch.where(scale > 0, scale, torch.nan)
            solved = torch.isfinite(ratio).all(1, keepdim=True)
            zero = torch.where(solved, ratio.nan_to_num().round().clamp(0, levels), zero)
            zero = zero.to(torch.int64)
        size = w.shape[1] // groups
        shifted = codes - zero.double().repeat_interleave(size, dim=1)
        _, scale = grid_least_squares(shifted, w, groups, second, offsets=False)
        stored_zero = zero if grid.kind == ZERO_POINT else None
        fitted = QuantGrid(grid.bits, grid.kind, scale.to(torch.float16), zero=stored_zero)
    tables = [fitted.scale] + [t for t in (fitted.offset,) if t is not None]
    usable = (fitted.scale > 0).all(1)
    for table in tables:
        usable &= torch.isfinite(table).all(1)
    return grid.select(usable, fitted)


def grid_least_squares(
    codes: Tensor, w: Tensor, groups: int, second: Tensor, offsets: bool = True
) -> tuple[Tensor | None, Tensor]:
    """Float64 `(offset, scale)` (out, groups) minimising every row's f_r(d) = d_r' M d_r with
    d = offset_g + scale_g * codes - w on each group g, the codes fixed (all float64 in; M =
    `second`, fan_in x fan_in); without `offsets`, the scales alone for d = scale_g * codes - w
    (offset None). A row whose system is singular gets NaN, for the caller to reject."""
    out, fan_in = w.shape
    size = fan_in // groups
    grouped = codes.reshape(out, groups, size)
    # Normal equations per row over theta = (offsets, scales): blocks 1'M1, 1'Mc, c'Mc and
    # right-hand sides 1'Mw, c'Mw, group by group, without forming the (out, fan_in, 2 groups)
    # design.
    ones_codes = torch.empty(out, groups, groups, dtype=w.dtype, device=w.device)
    codes_codes = torch.empty(out, groups, groups, dtype=w.dtype, device=w.device)
    for h in range(groups):
        product = (grouped[:, h] @ second[h * size : (h + 1) * size]).reshape(out, groups, size)
        ones_codes[:, :, h] = product.sum(-1)
        codes_codes[:, :, h] = (product * grouped).sum(-1)
    weighted = (w @ second).reshape(out, groups, size)
    right = (weighted * grouped).sum(-1)
    normal = codes_codes
    if offsets:
        ones = second.reshape(groups, size, groups, size).sum((1, 3))
        normal = torch.cat(
            [
                torch.cat([ones.expand(out, groups, groups), ones_codes], 2),
                torch.cat([ones_codes.transpose(1, 2), codes_codes], 2),
            ],
            1,
        )
        right = torch.cat([weighted.sum(-1), right], 1)
    theta, info = torch.linalg.solve_ex(normal, right)
    theta = torch.where((info == 0)[:, None], theta, torch.nan)
    if not offsets:
        return None, theta
    return theta[:, :groups], theta[:, groups:]


def _round_on(
    grouped: Tensor, bits: int, clip: float, grid: str, objective: _Objective, w: Tensor
) -> tuple[Tensor, QuantGrid, Tensor]:
    """Round-to-nearest codes (out, fan_in) on the grid clipped by `clip`, the grid, and f."""
    fitted = quant_grid(grouped, bits, grid, clip)
    codes = round_to_grid(grouped, fitted).reshape(w.shape)
    return codes, fitted, objective(_dequantize(codes, fitted) - w)


class _Objective:
    """f_r(d) = d_r' M d_r for every row of d at once, float64."""

    def __init__(self, second: Tensor) -> None:
        self.second = second

    def __call__(self, delta: Tensor) -> Tensor:
        return ((delta @ self.second) * delta).sum(1)


def _per_weight(grid: QuantGrid, fan_in: int) -> tuple[Tensor, Tensor]:
    """The grid's (lowest value, step), float64, repeated to every weight: (out, fan_in)."""
    low, step = grid.levels()
    shape = (*low.shape, fan_in // low.shape[1])
    return tuple(t[..., None].expand(shape).reshape(len(t), fan_in) for t in (low, step))


def _dequantize(codes: Tensor, grid: QuantGrid) -> Tensor:
    """The float64 values (out, fan_in) of integer or float `codes` on `grid`."""
    low, step = grid.levels()
    grouped = codes.reshape(*low.shape, -1)
    return (low[..., None] + step[..., None] * grouped).reshape(codes.shape)


def _sequential(
    w: Tensor, low: Tensor, step: Tensor, levels: Tensor, upper: Tensor, block: int = BLOCK
) -> Tensor:
    """Codes (float64, (candidates, out, fan_in)) rounded column by column, each column's error
    spread over the later columns so as to minimise sum_r d_r' M d_r (M damped to be invertible),
    for every candidate grid (`low`, `step`: (candidates, out, fan_in); `levels`: each one's
    highest code, (candidates,)) of the weight `w` (out, fan_in) at once.

    The error e_j of column j moves every later column k by -e_j U_jk (U = `upper`, from
    `_inverse_factor`). Columns are taken `block` at a time: within a block those moves are applied
    column by column to the block's later columns; the moves of all the block's columns onto the
    columns after it are one matrix product at the block's end (the same sums in another order)."""
    fan_in = w.shape[1]
    target = _columns(w.expand_as(low))
    low, step = _columns(low), _columns(step)
    varying = step > 0
    divisor = torch.where(varying, step, 1.0)
    top = levels.repeat_interleave(w.shape[0])
    codes = torch.empty_like(target)
    for start in range(0, fan_in, block):
        end = min(start + block, fan_in)
        errors = torch.empty_like(target[start:end])
        for j in range(start, end):
            q = torch.round((target[j] - low[j]) / divisor[j]).clamp_(min=0)
            q = torch.minimum(q, top, out=codes[j])
            torch.div(target[j] - (low[j] + step[j] * q), upper[j, j], out=errors[j - start])
            target[j + 1 : end].addr_(upper[j, j + 1 : end], errors[j - start], alpha=-1)
        if end < fan_in:
            target[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1)
    # a group of one value (step 0) gets code 0; its error is its value's whatever the code
    return _uncolumns(torch.where(varying, codes, 0.0), low.shape[1] // w.shape[0])


def _refine(
    codes: Tensor,
    w: Tensor,
    low: Tensor,
    step: Tensor,
    levels: Tensor,
    objective: _Objective,
    block: int = BLOCK,
) -> Tensor:
    """Coordinate descent on f over codes +-1, column by column, until a sweep changes nothing
    (at most `SWEEPS` sweeps), for every candidate (`codes`, `low`, `step`: (candidates, out,
    fan_in); `levels`: each one's highest code, (candidates,)) of the weight `w` at once.

    A move of code (r, j) by +-s changes f_r by c +- t with c = s^2 M_jj >= 0 and
    t = 2 s (d_r M)_j: raising it lowers f_r exactly when t < -c, lowering it exactly when t > c
    (never both), so those are the moves. d M is kept up to date: each block of `block` columns
    is copied out (one row per column), the moves of its earlier columns are added to its later
    columns one by one, and at the block's end its moves are added to every column of d M (as one
    matrix product, or move by move where they are fewer than `SPARSE` of its codes). Sweeping
    on after a sweep that changed nothing changes nothing, so candidates still moving do not
    change the others' result."""
    count = len(codes)
    second = objective.second
    fan_in = w.shape[1]
    # d M, one row per row of every candidate, as of the last block's end
    product = ((low + step * codes - w) @ second).reshape(-1, fan_in)
    codes, step = _columns(codes), _columns(step)
    twice = 2 * step
    curvature = step**2 * second.diagonal()[:, None]  # c
    bound = -curvature
    varying = step > 0
    top = levels.repeat_interleave(w.shape[0])
    ceiling = torch.where(varying, top, -1.0)  # raise a code only below it
    floor = torch.where(varying, 0.0, torch.inf)  # lower one only above it
    for _ in range(SWEEPS):
        changed = False
        for start in range(0, fan_in, block):
            end = min(start + block, fan_in)
            local = product[:, start:end].T.contiguous()  # (d M)_j for the block's columns
            shifts = torch.zeros_like(local)
            for j in range(start, end):
                k = j - start
                slope = twice[j] * local[k]
                raising = (codes[j] < ceiling[j]) & (slope < bound[j])
                lowering = (codes[j] > floor[j]) & (slope > curvature[j])
                move = torch.where(lowering, -1.0, raising.double())
                codes[j] += move
                torch.mul(move, step[j], out=shifts[k])
                local[k + 1 :].addr_(second[j, j + 1 : end], shifts[k])
            column, row = shifts.nonzero(as_tuple=True)
            if len(row) > SPARSE * shifts.numel():
                changed = True
                product.addmm_(shifts.T, second[start:end])
            elif len(row):
                changed = True
                moves = second[start + column] * shifts[column, row, None]
                product.index_add_(0, row, moves)
        if not changed:
            break
    return _uncolumns(codes, count)


def _columns(x: Tensor) -> Tensor:
    """(candidates, out, fan_in) -> (fan_in, candidates * out), contiguous: one row per column of
    the weight, so that a column of every candidate is one contiguous vector."""
    return x.permute(2, 0, 1).reshape(x.shape[2], -1).contiguous()


def _uncolumns(x: Tensor, count: int) -> Tensor:
    """The inverse of `_columns` for `count` candidates."""
    return x.reshape(x.shape[0], count, -1).permute(1, 2, 0).contiguous()
