"""Adaptive quantization: the 1-D k-means C step (exact by dynamic programming, Lloyd beyond),
against brute force on small cases, and the codebook layer's storage."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.schemes import Codebook, parse_scheme
from allot.schemes.kmeans import kmeans_1d, lloyd_1d, squared_error


def _brute_force(x: np.ndarray, k: int) -> float:
    """The least squared error over every assignment of the values to k clusters."""
    best = math.inf
    for labels in itertools.product(range(k), repeat=x.size):
        assigned = np.array(labels)
        error = sum(
            float(((x[assigned == c] - x[assigned == c].mean()) ** 2).sum())
            for c in range(k)
            if (assigned == c).any()
        )
        best = min(best, error)
    return best


def _cases() -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    cases = []
    for trial in range(60):
        n, k = int(rng.integers(3, 9)), int(rng.integers(2, 4))
        x = rng.standard_normal(n) if trial % 3 else rng.integers(0, 3, n).astype(np.float64)
        cases.append((x, k))
    return cases


@pytest.mark.parametrize(("x", "k"), _cases())
def test_the_exact_fit_is_the_brute_force_optimum(x: np.ndarray, k: int) -> None:
    assert squared_error(x, kmeans_1d(x, k, exact=True)) == pytest.approx(
        _brute_force(x, k), abs=1e-10
    )


@pytest.mark.parametrize(("x", "k"), _cases()[:20])
def test_lloyd_reaches_a_fixed_point_between_the_optimum_and_its_start(x, k) -> None:
    rng = np.random.default_rng(1)
    start = np.sort(rng.standard_normal(k))
    fitted = lloyd_1d(np.sort(x), start)
    optimum = _brute_force(x, k)
    assert optimum - 1e-12 <= squared_error(x, fitted) <= squared_error(x, start) + 1e-12
    assert np.array_equal(lloyd_1d(np.sort(x), fitted), fitted)  # nothing moves any more
    exact = kmeans_1d(x, k, exact=True)
    assert squared_error(x, lloyd_1d(np.sort(x), exact)) == pytest.approx(optimum, abs=1e-10)


def test_large_cases_take_lloyd_from_a_subsample_and_stay_near_the_optimum(monkeypatch) -> None:
    import allot.schemes.kmeans as kmeans

    monkeypatch.setattr(kmeans, "EXACT_LIMIT", 8 * 400)  # a 400-value subsample starts Lloyd
    x = np.random.default_rng(2).laplace(size=5000)
    assert not kmeans.exact_fits(x.size, 8)
    exact = squared_error(x, kmeans_1d(x, 8, exact=True))
    assert exact <= squared_error(x, kmeans_1d(x, 8)) <= 1.001 * exact


def test_fewer_distinct_values_than_entries_are_fitted_exactly() -> None:
    x = np.array([1.0, 1.0, 3.0, 3.0, 3.0])
    assert squared_error(x, kmeans_1d(x, 4)) == 0


def test_the_layer_stores_the_fit_and_reconstructs_the_nearest_entries() -> None:
    spec = LayerSpec("conv1d", 6, 5, (3,), bias=False)
    w = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(3))
    layer = Codebook(4).compress(w, None, spec)
    book = layer.codebook.detach()
    assert torch.equal(book, book.sort().values)
    nearest = book[(w.reshape(-1, 1) - book).abs().argmin(1)].reshape(w.shape)
    torch.testing.assert_close(layer.reconstruct(), nearest)
    x = w.double().numpy()
    assert float((layer.reconstruct().detach() - w).double().pow(2).sum()) == pytest.approx(
        squared_error(x, kmeans_1d(x, 4)), rel=1e-5
    )


def test_the_c_step_warm_starts_from_the_previous_codebook(monkeypatch) -> None:
    import allot.schemes.codebook as module

    seen = {}

    def spy(values, k, start=None, exact=None):
        seen["start"] = start
        return kmeans_1d(values, k, start, exact)

    monkeypatch.setattr(module, "kmeans_1d", spy)
    spec = LayerSpec("linear", 4, 8, bias=False)
    w = torch.randn(spec.weight_shape)
    first = Codebook(4).project(w, None, spec)
    assert seen["start"] is None
    Codebook(4).project(w + 0.01, None, spec, previous=first)
    assert np.array_equal(seen["start"], first.codebook.detach().double().numpy())


@pytest.mark.parametrize(("size", "bits"), [(2, 1), (3, 2), (4, 2), (5, 3), (256, 8)])
def test_storage_is_packed_codes_plus_the_codebook(size: int, bits: int) -> None:
    spec = LayerSpec("linear", 7, 9)
    assert Codebook(size).storage_bits(spec) == 8 * math.ceil(63 * bits / 8) + 32 * size


@pytest.mark.parametrize("size", [1, 0, 2**16 + 1, 2.0, True])
def test_invalid_sizes_are_named(size) -> None:
    with pytest.raises(ConfigError, match=r"Codebook\.size"):
        Codebook(size)
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_scheme("codebook")


def test_a_forged_code_beyond_the_codebook_is_refused_on_load() -> None:
    """Three entries at 2 bits leave code 3 unused: a stored 3 fails `check_state` (run on every
    loaded layer) with one line, not an index error at the first forward pass."""
    spec = LayerSpec("linear", 4, 6, bias=False)
    layer = Codebook(3).project(torch.randn(4, 6), None, spec)
    layer.check_state()
    layer.codes.fill_(0xFF)  # every packed 2-bit code becomes 3
    with pytest.raises(ConfigError, match="exceeds the codebook's 3 entries"):
        layer.check_state()
