"""Quant: the rounding maths, the 1-bit optimum, group checks, storage and field validation."""

from __future__ import annotations

import pytest
import torch

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.quant import QuantizedLayer, dequantize
from allot.schemes import Quant, parse_scheme
from allot.schemes.grid import quantize_rtn


def _weight(out: int = 6, fan_in: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows on different scales and centres, so groups differ
    return torch.randn(out, fan_in, generator=g) * torch.rand(out, 1, generator=g) + 0.3


def _per_group(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    return t.reshape(t.shape[0], n_groups, -1)


@pytest.mark.parametrize("group", [None, 8])
@pytest.mark.parametrize("bits", range(2, 9))
def test_error_is_at_most_half_a_step_and_codes_span_the_range(bits: int, group: int | None):
    w = _weight()
    codes, scale, offset = quantize_rtn(w, bits, group)
    n_groups = scale.shape[1]
    assert scale.dtype == offset.dtype == torch.float16
    assert n_groups == (1 if group is None else 32 // group)
    err = _per_group((w - dequantize(codes, scale, offset)).abs(), n_groups)
    half_step = scale.float()[..., None] / 2
    assert (err <= half_step + 1e-6 * w.abs().max()).all()
    q = _per_group(codes, n_groups)
    assert (q.amin(-1) == 0).all()
    assert (q.amax(-1) == 2**bits - 1).all()


def test_constant_groups_get_zero_scale_and_stay_exact():
    w = _weight(4, 16)
    w[0] = 0.25  # exactly representable in float16
    w[1, :8] = 0.0
    codes, scale, offset = quantize_rtn(w, 4, 8)
    assert scale[0, 0] == 0 and scale[0, 1] == 0 and scale[1, 0] == 0
    w_hat = dequantize(codes, scale, offset)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[0], w[0]) and torch.equal(w_hat[1, :8], w[1, :8])


def test_non_finite_weights_are_refused():
    w = _weight(2, 8)
    w[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        quantize_rtn(w, 4)
    with pytest.raises(ConfigError, match="float16 range"):
        quantize_rtn(_weight(2, 8) * 1e6, 1)


@pytest.mark.parametrize("group", [None, 4])
def test_one_bit_scale_is_mean_abs_and_least_squares_optimal(group: int | None):
    w = _weight(3, 16)
    _, scale, offset = quantize_rtn(w, 1, group)
    assert offset is None
    n_groups = scale.shape[1]
    mean_abs = _per_group(w.abs(), n_groups).mean(-1)
    assert torch.equal(scale, mean_abs.half())
    # brute force: the scale a minimising |w - a sign(w)|^2 over a fine grid is mean |w|
    groups = _per_group(w, n_groups).reshape(-1, w.shape[1] // n_groups).double()
    for wg, a in zip(groups, mean_abs.reshape(-1).double(), strict=True):
        grid = torch.linspace(0, 2 * wg.abs().max().item(), 20001, dtype=torch.float64)
        sign = torch.where(wg >= 0, 1.0, -1.0)
        sq_err = ((wg[None, :] - grid[:, None] * sign[None, :]) ** 2).sum(1)
        assert abs(grid[sq_err.argmin()] - a) <= grid[1]


def test_one_bit_sign_of_zero_is_plus():
    w = torch.tensor([[0.0, -1.0, 2.0, 0.0]])
    codes, scale, offset = quantize_rtn(w, 1)
    assert codes.tolist() == [[1, 0, 1, 1]]
    assert dequantize(codes, scale, offset).tolist() == [[0.75, -0.75, 0.75, 0.75]]


def test_from_codes_builds_the_same_stored_form_from_another_rounding():
    spec = LayerSpec("linear", 6, 32)
    w = _weight()
    _, scale, offset = quantize_rtn(w, 3, 8)
    # another rounding rule (floor) against the same grid
    step = scale.float().repeat_interleave(8, dim=1)
    codes = ((w - offset.float().repeat_interleave(8, dim=1)) / step).floor().clamp(0, 7).long()
    layer = QuantizedLayer.from_codes(spec, 3, codes, scale, offset, torch.zeros(6))
    assert torch.equal(layer.unpacked_codes(), codes)
    assert torch.equal(layer.reconstruct(), dequantize(codes, scale, offset))
    assert layer.storage_bits() == Quant(3, 8).storage_bits(spec)


def test_from_codes_checks_its_inputs():
    spec = LayerSpec("linear", 6, 32, bias=False)
    codes, scale, offset = quantize_rtn(_weight(), 4)
    with pytest.raises(ConfigError, match="float16"):
        QuantizedLayer.from_codes(spec, 4, codes, scale.float(), offset)
    with pytest.raises(ConfigError, match="offset is stored exactly when bits >= 2"):
        QuantizedLayer.from_codes(spec, 4, codes, scale, None)
    with pytest.raises(ConfigError, match="shape"):
        QuantizedLayer.from_codes(spec, 4, codes[:, :16], scale, offset)
    with pytest.raises(ConfigError, match="codes must lie in"):
        QuantizedLayer.from_codes(spec, 4, codes + 1, scale, offset)


@pytest.mark.parametrize("method", ["check", "storage_bits", "empty"])
def test_group_must_divide_fan_in(method: str):
    spec = LayerSpec("conv2d", 2, 3, (2, 2))  # fan_in 12
    with pytest.raises(ConfigError, match=r"Quant\.group=5 .* fan_in 12 .*: 1, 2, 3, 4, 6, 12$"):
        getattr(Quant(4, 5), method)(spec)
    getattr(Quant(4, 6), method)(spec)


@pytest.mark.parametrize(
    ("scheme", "spec", "bits"),
    [
        # 120 weights: 60 bytes of codes, 6 float16 scales and 6 float16 offsets
        (Quant(4), LayerSpec("linear", 6, 20), 8 * 60 + 16 * 6 + 16 * 6),
        (Quant(1), LayerSpec("linear", 6, 20), 8 * 15 + 16 * 6),
        (Quant(3, 4), LayerSpec("linear", 6, 20), 8 * 45 + 32 * 30),
        (Quant(3), LayerSpec("linear", 3, 5), 8 * 6 + 32 * 3),  # 45 bits round up to 6 bytes
        (Quant(2, 9), LayerSpec("conv2d", 4, 2, (3, 3)), 8 * 18 + 32 * 8),
    ],
)
def test_storage_formula(scheme: Quant, spec: LayerSpec, bits: int):
    assert scheme.storage_bits(spec) == bits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "Quant.bits must be an int in 1..8, got 9"),
        ({"bits": 0}, "Quant.bits"),
        ({"bits": 4.0}, "Quant.bits"),
        ({"bits": True}, "Quant.bits"),
        ({"bits": "4"}, "Quant.bits"),
        ({"bits": 4, "group": 0}, "Quant.group must be an int >= 1, got 0"),
        ({"bits": 4, "group": 2.5}, "Quant.group"),
    ],
)
def test_invalid_fields_are_named(kwargs: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        Quant(**kwargs)


@pytest.mark.parametrize("text", ["quant", "quant:x", "quant:4:64", "quant:4:g64:1", "quant:9"])
def test_bad_string_forms_raise(text: str):
    with pytest.raises(ConfigError):
        parse_scheme(text)


def test_label():
    assert Quant(4).label() == "quant4"
    assert Quant(4, 64).label() == "quant4g64"
