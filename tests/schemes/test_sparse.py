"""Sparse: exactly the top-k magnitudes, error = dropped weights, k and index widths, fields."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.sparse import SparseLayer, index_bits
from allot.schemes import Sparse, parse_scheme

SPEC = LayerSpec("conv1d", 10, 13, (1,), bias=False)  # 130 weights


def test_keeps_exactly_the_top_k_magnitudes():
    w = torch.randn(SPEC.weight_shape, generator=torch.Generator().manual_seed(0))
    layer = Sparse(0.1).compress(w, None, SPEC)
    top = torch.topk(w.abs().reshape(-1), 13).indices
    assert layer.positions().tolist() == sorted(top.tolist())
    assert torch.equal(layer.values, w.reshape(-1)[layer.positions()])
    dropped = w.clone().reshape(-1)
    dropped[top] = 0
    residual = w - layer.reconstruct()
    assert torch.equal(residual.reshape(-1), dropped)
    assert residual.norm() == dropped.norm()


def test_ties_go_to_the_lower_position():
    spec = LayerSpec("linear", 2, 5, bias=False)
    w = torch.tensor([[1.0, -2.0, 1.0, 2.0, 1.0], [-1.0, 1.0, 2.0, 1.0, 1.0]])
    assert Sparse(0.3).compress(w, None, spec).positions().tolist() == [1, 3, 7]
    assert Sparse(0.5).compress(w, None, spec).positions().tolist() == [0, 1, 2, 3, 7]


@pytest.mark.parametrize(
    ("density", "numel", "kept"),
    [(0.05, 120, 6), (0.001, 120, 1), (1.0, 120, 120), (0.5, 5, 3), (0.25, 10, 3), (0.3, 7, 2)],
)
def test_kept_count_rounds_half_up_and_keeps_at_least_one(density, numel, kept):
    assert Sparse(density).kept(LayerSpec("linear", 1, numel)) == kept


@pytest.mark.parametrize(("numel", "width"), [(1, 1), (2, 1), (3, 2), (512, 9), (513, 10)])
def test_index_width_is_ceil_log2(numel: int, width: int):
    assert index_bits(numel) == width


@pytest.mark.parametrize(
    ("scheme", "spec", "bits"),
    [
        (Sparse(1.0), LayerSpec("linear", 1, 1), 32 + 8),
        (Sparse(0.05), LayerSpec("linear", 16, 32), 32 * 26 + 8 * math.ceil(26 * 9 / 8)),
        (Sparse(0.1), SPEC, 32 * 13 + 8 * math.ceil(13 * 8 / 8)),
    ],
)
def test_storage_formula(scheme: Sparse, spec: LayerSpec, bits: int):
    assert scheme.storage_bits(spec) == bits


def test_stores_no_dense_mask():
    layer = Sparse(0.1).compress(torch.randn(SPEC.weight_shape), None, SPEC)
    assert {k: v.numel() for k, v in layer.state_dict().items()} == {"values": 13, "indices": 13}


def test_from_values_checks_positions():
    values = torch.ones(3)
    for bad in ([2, 1, 5], [1, 1, 5], [-1, 2, 3], [1, 2, 130]):
        with pytest.raises(ConfigError, match="strictly increasing"):
            SparseLayer.from_values(SPEC, torch.tensor(bad), values)
    with pytest.raises(ConfigError, match="equal length"):
        SparseLayer.from_values(SPEC, torch.tensor([1, 2]), values)


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_invalid_density_is_named(density):
    with pytest.raises(ConfigError, match=r"Sparse.density must be a number in \(0, 1\]"):
        Sparse(density)


@pytest.mark.parametrize("text", ["sparse", "sparse:x", "sparse:0.1:2", "sparse:2"])
def test_bad_string_forms_raise(text: str):
    with pytest.raises(ConfigError):
        parse_scheme(text)


def _l1_projection_by_bisection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """The l1-ball projection by bisection on the soft threshold (a reference, float64)."""
    v = v.double()
    if float(v.abs().sum()) <= radius:
        return v
    low, high = 0.0, float(v.abs().max())
    for _ in range(200):
        theta = (low + high) / 2
        if float((v.abs() - theta).clamp(min=0).sum()) > radius:
            low = theta
        else:
            high = theta
    return torch.sign(v) * (v.abs() - high).clamp(min=0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("radius", [0.3, 1.5, 100.0])
def test_l1_fit_is_the_brute_force_optimum_over_supports(seed: int, radius: float) -> None:
    spec = LayerSpec("linear", 2, 4, bias=False)  # 8 weights, 3 kept
    w = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(seed))
    layer = Sparse(0.375, radius).compress(w, None, spec)
    assert layer.count == 3
    flat = w.reshape(-1).double()
    best = min(
        float(flat.pow(2).sum() - flat[list(s)].pow(2).sum())
        + float((flat[list(s)] - _l1_projection_by_bisection(flat[list(s)], radius)).pow(2).sum())
        for s in itertools.combinations(range(8), 3)
    )
    error = float((layer.reconstruct().double() - w.double()).pow(2).sum())
    assert error == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert float(layer.values.double().abs().sum()) <= radius * (1 + 1e-6)


def test_l1_radius_string_json_and_validation() -> None:
    scheme = parse_scheme("sparse:0.05:l1=2.5")
    assert scheme == Sparse(0.05, 2.5) and scheme.label() == "sparse0.05-l1=2.5"
    assert Sparse(0.05).label() == "sparse0.05"
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match=r"Sparse\.l1"):
            Sparse(0.05, bad)
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_scheme("sparse:0.05:2.5")
