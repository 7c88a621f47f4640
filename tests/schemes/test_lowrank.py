"""LowRank: Eckart-Young error, full rank is exact, factor constructor, rank checks, storage."""

from __future__ import annotations

import pytest
import torch

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.lowrank import LowRankLayer
from allot.schemes import LowRank, parse_scheme

SPEC = LayerSpec("conv2d", 9, 2, (1, 7))  # fan_in 14, full rank 9


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(SPEC.weight_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rank", range(1, 10))
def test_error_is_the_discarded_singular_values(rank: int):
    w = _weight()
    s = torch.linalg.svdvals(w.reshape(9, 14).double())
    w_hat = LowRank(rank).compress(w, torch.zeros(9), SPEC).reconstruct()
    err = (w.double() - w_hat.double()).norm().item()
    expected = s[rank:].square().sum().sqrt().item()
    assert err == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_full_rank_reproduces_the_weight():
    w = _weight()
    w_hat = LowRank(9).compress(w, torch.zeros(9), SPEC).reconstruct()
    torch.testing.assert_close(w_hat, w, rtol=1e-5, atol=1e-5)


def test_factors_are_balanced():
    layer = LowRank(4).compress(_weight(), torch.zeros(9), SPEC)
    # U sqrt(S) and sqrt(S) V': both factors carry the same singular-value weight per component
    torch.testing.assert_close(layer.u.norm(dim=0), layer.v.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_from_factors_stores_any_factorisation():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(9, 3, generator=g), torch.randn(3, 14, generator=g)
    layer = LowRankLayer.from_factors(SPEC, u, v, torch.zeros(9))
    assert layer.rank == 3
    torch.testing.assert_close(layer.reconstruct(), (u @ v).view(SPEC.weight_shape))
    with pytest.raises(ConfigError, match="factors"):
        LowRankLayer.from_factors(SPEC, u, v[:2], torch.zeros(9))
    with pytest.raises(ConfigError, match="do not fit"):
        LowRankLayer.from_factors(SPEC, u[:8], v, torch.zeros(9))


def test_rank_above_full_rank_is_refused():
    with pytest.raises(ConfigError, match=r"LowRank.rank=10 exceeds the layer's full rank 9"):
        LowRank(10).check(SPEC)
    with pytest.raises(ConfigError, match="full rank"):
        LowRank(10).storage_bits(SPEC)
    wide = LayerSpec("conv2d", 20, 2, (3, 3))  # the kernel counts in fan_in: 18
    LowRank(18).check(wide)
    with pytest.raises(ConfigError, match=r"use 1\.\.18"):
        LowRank(19).check(wide)


def test_storage_formula():
    assert LowRank(3).storage_bits(LayerSpec("conv2d", 20, 2, (3, 3))) == 32 * 3 * (20 + 18)
    assert LowRank(1).storage_bits(LayerSpec("linear", 4, 5)) == 32 * 9


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "2"])
def test_invalid_rank_is_named(rank):
    with pytest.raises(ConfigError, match=r"LowRank\.rank must be an int >= 1"):
        LowRank(rank)


@pytest.mark.parametrize("text", ["rank", "rank:x", "rank:2:3", "rank:0"])
def test_bad_string_forms_raise(text: str):
    with pytest.raises(ConfigError):
        parse_scheme(text)


@pytest.mark.parametrize("price", [0.0, 1e-4, 1e-3, 3e-3, 1e-2, 1.0])
def test_rank_selection_is_the_brute_force_optimum(price: float):
    w = _weight(5)

    def objective(rank: int) -> float:
        fitted = LowRank(rank).compress(w, None, SPEC.with_channels(bias=False)).reconstruct()
        error = float((w.double() - fitted.double()).pow(2).sum())
        return error + price * LowRank(rank).storage_bits(SPEC)

    chosen = LowRank(4).select(w, SPEC, price)
    values = [objective(r) for r in range(1, 10)]
    assert objective(chosen.rank) == pytest.approx(min(values), rel=1e-5, abs=1e-6)
    if price == 0:
        assert chosen.rank == 9  # nothing to pay: the exact factorisation
    if price == 1.0:
        assert chosen.rank == 1
