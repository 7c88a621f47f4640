"""Uniform quantization grids in their stored form, and round-to-nearest codes on them.

A grid covers `out x groups` groups of consecutive fan-in entries (`allot.modules.quant` defines
the three grids and what they store). Scales and offsets are float16 as `QuantizedLayer` stores
them, zero points integers, and codes are chosen against those stored values, so a saved layer
reproduces exactly what was fitted.

How each grid is fitted to a group's range [lo, hi] (the group's minimum and maximum times
`clip`), with L = 2**bits - 1 steps:
- float-offset: offset = lo rounded down to float16, scale = (hi - offset) / L rounded up;
- zero-point: the range is widened to include 0 (lo <= 0 <= hi), as ONNX, torch and NNCF do;
  s0 = (hi - lo) / L, the zero point z = round(-lo / s0) clamped to [0, L], and then the scale the
  smallest step >= s0 whose grid s (q - z) still covers [lo, hi] (rounding z moved the grid),
  rounded up to float16;
- symmetric: the zero point is fixed at m = 2**(bits-1) (codes -m .. m - 1), scale the smallest
  step that covers the range widened to include 0, max(-lo / m, hi / (m - 1)), rounded up.
So every weight within the range is at most half a step from its code's value. A group whose
range is 0 gets scale 0 (its values are then exact: the offset, or 0). bits == 1 (every grid):
scaled sign, scale = clip * mean |w| per group (the least-squares optimal scale for fixed signs),
sign(0) = +1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.exceptions import ConfigError
from allot.modules.quant import (
    FLOAT_OFFSET,
    SYMMETRIC,
    QuantGrid,
    group_count,
    stored_grid,
)


def _to_float16(x: Tensor, toward: float) -> Tensor:
    """`x` rounded to float16 toward `toward` (+inf or -inf), so the result bounds `x`."""
    h = x.to(torch.float16)
    overshoot = h.to(x.dtype) < x if toward > 0 else h.to(x.dtype) > x
    return torch.where(overshoot, torch.nextafter(h, torch.full_like(h, toward)), h)


def quantize_rtn(
    weight_2d: Tensor, bits: int, group: int | None, grid: str
) -> tuple[Tensor, QuantGrid]:
    """Round-to-nearest quantization of a folded (out, fan_in) weight on the min-max `grid`:
    int64 codes (out, fan_in) in [0, 2**bits - 1] and the grid's stored tables."""
    out, fan_in = weight_2d.shape
    w = weight_2d.detach().to(torch.float32).reshape(out, group_count(fan_in, group), -1)
    fitted = quant_grid(w, bits, grid)
    return round_to_grid(w, fitted).reshape(out, fan_in), fitted


def quant_grid(w: Tensor, bits: int, grid: str, clip: Tensor | float = 1.0) -> QuantGrid:
    """The stored `grid` (tables (out, groups)) of grouped weights `w` (out, groups, size) over
    `clip` times each group's range (clip < 1 clips the extremes); `clip` is a float or a tensor
    broadcasting against (out, groups). `ConfigError` for non-finite weights or scales beyond
    float16."""
    w = w.to(torch.float32)
    kind = stored_grid(bits, grid)
    levels = 2**bits - 1
    offset = zero = None
    if bits == 1:
        scale = (clip * w.abs().mean(-1)).to(torch.float16)
    elif kind == FLOAT_OFFSET:
        offset = _to_float16(clip * w.amin(-1), float("-inf"))
        scale = _to_float16((clip * w.amax(-1) - offset.to(torch.float32)) / levels, float("inf"))
    else:
        low = (clip * w.amin(-1)).clamp(max=0)
        high = (clip * w.amax(-1)).clamp(min=0)
        if kind == SYMMETRIC:
            middle = 2 ** (bits - 1)
            step = torch.maximum(-low / middle, high / (middle - 1))
        else:
            step = (high - low) / levels
            safe = torch.where(step > 0, step, 1.0)
            zero = torch.round(-low / safe).clamp(0, levels)
            below = torch.where(zero > 0, -low / zero.clamp(min=1), 0.0)
            above = torch.where(zero < levels, high / (levels - zero).clamp(min=1), 0.0)
            step = torch.maximum(step, torch.maximum(below, above))
            zero = torch.where(step > 0, zero, 0.0).to(torch.int64)
        scale = _to_float16(step, float("inf"))
    finite = torch.isfinite(scale).all() and (offset is None or torch.isfinite(offset).all())
    if not finite or not torch.isfinite(w).all():
        raise ConfigError(
            "cannot quantize: the weight has non-finite values or exceeds the float16 range of "
            "the stored scales (|w| up to 65504)"
        )
    return QuantGrid(bits, kind, scale, offset, zero)


def round_to_grid(w: Tensor, grid: QuantGrid) -> Tensor:
    """Nearest codes (int64, like `w`: (out, groups, size)) on the stored grid; a group whose
    step is 0 gets the code of its one value (0, or the zero point)."""
    if grid.bits == 1:
        return (w >= 0).to(torch.int64)
    low, step = (t.to(torch.float32)[..., None] for t in grid.levels())
    varying = step > 0
    q = torch.round((w.to(torch.float32) - low) / torch.where(varying, step, 1.0))
    zero = grid.zero_points()
    constant = 0.0 if zero is None else zero[..., None].to(torch.float32)
    return torch.where(varying, q, constant).clamp(0, 2**grid.bits - 1).to(torch.int64)
