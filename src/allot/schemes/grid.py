"""Uniform quantization grids in their stored float16 form, and round-to-nearest codes on them.

A grid covers `out x groups` groups of consecutive fan-in weights. bits >= 2: code q in
[0, 2**bits - 1] stands for offset + scale q; bits == 1: q in {0, 1} stands for scale (2 q - 1).
Scales and offsets are float16 as stored by `QuantizedLayer`, and codes are chosen against those
stored values, so a saved layer reproduces exactly what was fitted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.exceptions import ConfigError
from allot.modules.quant import group_count


def _to_float16(x: Tensor, toward: float) -> Tensor:
    """`x` rounded to float16 toward `toward` (+inf or -inf), so the result bounds `x`."""
    h = x.to(torch.float16)
    overshoot = h.to(x.dtype) < x if toward > 0 else h.to(x.dtype) > x
    return torch.where(overshoot, torch.nextafter(h, torch.full_like(h, toward)), h)


def quantize_rtn(
    weight_2d: Tensor, bits: int, group: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of a folded (out, fan_in) weight.

    Returns `(codes, scale, offset)`: int64 codes (out, fan_in) in [0, 2**bits - 1], and float16
    `scale`, `offset` of shape (out, n_groups) in the stored form of `QuantizedLayer`.

    bits >= 2: asymmetric min-max grid. The offset is the group minimum rounded down to float16 and
    the scale the step that reaches the group maximum rounded up, so the stored grid covers every
    weight and the error per element is at most scale / 2; codes are chosen against the stored
    float16 values, so the saved layer reproduces them exactly. A constant group gets scale 0.
    bits == 1: scaled sign, scale = mean |w| per group (the least-squares optimal scale for fixed
    signs), sign(0) = +1, offset None.
    """
    out, fan_in = weight_2d.shape
    w = weight_2d.detach().to(torch.float32).reshape(out, group_count(fan_in, group), -1)
    scale, offset = quant_grid(w, bits)
    return round_to_grid(w, bits, scale, offset).reshape(out, fan_in), scale, offset


def quant_grid(w: Tensor, bits: int, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Stored float16 `(scale, offset)` (out, groups) of grouped weights `w` (out, groups, size).

    bits >= 2: the min-max grid of `clip` times each group's minimum and maximum (clip < 1 clips
    the extremes; the stored grid still covers that range); bits == 1: scale = clip * mean |w|,
    no offset. `clip` is a float or a tensor broadcasting against (out, groups).
    """
    w = w.to(torch.float32)
    if bits == 1:
        scale, offset = (clip * w.abs().mean(-1)).to(torch.float16), None
    else:
        offset = _to_float16(clip * w.amin(-1), float("-inf"))
        spread = clip * w.amax(-1) - offset.to(torch.float32)
        scale = _to_float16(spread / (2**bits - 1), float("inf"))
    finite = torch.isfinite(scale).all() and (offset is None or torch.isfinite(offset).all())
    if not finite:
        raise ConfigError(
            "cannot quantize: the weight has non-finite values or exceeds the float16 range of "
            "the stored scales (|w| up to 65504)"
        )
    return scale, offset


def grid_levels(bits: int, scale: Tensor, offset: Tensor | None) -> tuple[Tensor, Tensor]:
    """The grid as (lowest value, step), float64 (out, groups): value of code q = low + step q."""
    step = scale.double()
    if offset is None:  # scaled sign: -s, +s
        return -step, 2 * step
    return offset.double(), step


def round_to_grid(w: Tensor, bits: int, scale: Tensor, offset: Tensor | None) -> Tensor:
    """Nearest codes (int64, like `w`: (out, groups, size)) on the stored grid; a group whose
    step is 0 gets code 0."""
    if bits == 1:
        return (w >= 0).to(torch.int64)
    low, step = (t.to(torch.float32)[..., None] for t in grid_levels(bits, scale, offset))
    varying = step > 0
    q = torch.round((w.to(torch.float32) - low) / torch.where(varying, step, 1.0))
    return torch.where(varying, q, 0.0).clamp(0, 2**bits - 1).to(torch.int64)
