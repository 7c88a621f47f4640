"""Scaled ternary: the closed-form C step against brute force, and its stored form."""

from __future__ import annotations

import itertools

import pytest
import torch

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.schemes import Ternary, parse_scheme
from allot.schemes.ternary import ternary_scale, ternary_signs


def _brute_force(row: torch.Tensor) -> float:
    """The least |w - a c|^2 over every code vector c in {-1, 0, 1}^n and every scale a >= 0."""
    w = row.double()
    best = float(w.pow(2).sum())
    for codes in itertools.product((-1.0, 0.0, 1.0), repeat=w.numel()):
        c = torch.tensor(codes, dtype=torch.float64)
        if c.abs().sum() == 0:
            continue
        a = max(float((c * w).sum() / c.pow(2).sum()), 0.0)
        best = min(best, float((w - a * c).pow(2).sum()))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_closed_form_is_the_brute_force_optimum(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    if seed % 4 == 0:
        w[0] = torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.5])  # ties and zeros
    scale = ternary_scale(w)
    fitted = ternary_signs(w, scale).double() * scale[:, None]
    for row in range(3):
        error = float((w[row] - fitted[row]).pow(2).sum())
        assert error == pytest.approx(_brute_force(w[row]), abs=1e-12)


def test_the_layer_stores_two_bits_and_a_float16_scale_per_channel() -> None:
    spec = LayerSpec("conv2d", 4, 3, (3, 3))
    w = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(4)
    layer = Ternary().compress(w, bias, spec)
    assert {k: (v.dtype, v.numel()) for k, v in layer.state_dict().items()} == {
        "bias": (torch.float32, 4),
        "codes": (torch.uint8, 27),  # 108 codes at 2 bits
        "scale": (torch.float16, 4),
    }
    assert Ternary().storage_bits(spec) == 8 * 27 + 16 * 4
    levels = layer.reconstruct().reshape(4, -1) / layer.scale.float()[:, None]
    assert set(levels.unique().tolist()) <= {-1.0, 0.0, 1.0}
    folded = w.reshape(4, -1).double()
    # the stored scale is the closed form's, rounded to float16
    torch.testing.assert_close(layer.scale, ternary_scale(folded).to(torch.float16))


def test_string_form() -> None:
    assert parse_scheme("ternary") == Ternary()
    with pytest.raises(Exception, match="no arguments"):
        parse_scheme("ternary:2")


def test_a_forged_code_that_stands_for_no_value_is_refused_on_load() -> None:
    spec = LayerSpec("linear", 4, 6, bias=False)
    layer = Ternary().project(torch.randn(4, 6), None, spec)
    layer.check_state()
    layer.codes.fill_(0xFF)  # every packed 2-bit code becomes 3
    with pytest.raises(ConfigError, match="stands for no value"):
        layer.check_state()
