"""Grouped (ALDS): k = 1 is plain SVD, the module computes W_hat x, each group is its own best
rank-j fit, the error lies between the reference code's proxy and the paper's bound (on every
layer of the benchmark models too), storage and MACs are what the two operations hold and do."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECS, make_case
from torch import nn

from allot.api import prepare
from allot.discover import LayerSpec, fold_weight_2d, get_weight
from allot.errors import spectral_norm
from allot.evaluate import macs
from allot.exceptions import ConfigError
from allot.modules.grouped import GroupedLayer
from allot.schemes import Grouped, LowRank, parse_scheme
from allot.schemes.grouped import divisors
from allot.zoo import create_model

CASES = {name: make_case(spec, seed=3) for name, spec in SPECS.items()}


def _operator_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(fold_weight_2d(matrix).double(), ord=2))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_one_group_is_plain_low_rank(name: str, rank: int) -> None:
    case = CASES[name]
    grouped = Grouped(1, rank).compress(case.weight, case.bias, case.spec)
    plain = LowRank(rank).compress(case.weight, case.bias, case.spec)
    assert torch.equal(grouped.u, plain.u) and torch.equal(grouped.v, plain.v)
    assert Grouped(1, rank).storage_bits(case.spec) == LowRank(rank).storage_bits(case.spec)
    with torch.no_grad():
        torch.testing.assert_close(grouped(case.x), plain(case.x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grouped.reconstruct(), plain.reconstruct())


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(("groups", "rank"), [(1, 2), (2, 1), (2, 3), (4, 2)])
def test_the_module_computes_w_hat_x_in_float64(name: str, groups: int, rank: int) -> None:
    case = CASES[name]
    module = Grouped(groups, rank).compress(case.weight, case.bias, case.spec).double()
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(case.x.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            expected = case.spec.forward(x, module.reconstruct(), module.bias)
            torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SPECS))
def test_each_group_is_its_best_rank_j_fit(name: str) -> None:
    case = CASES[name]
    groups, rank = 2, 2
    w_hat = Grouped(groups, rank).compress(case.weight, case.bias, case.spec).reconstruct().detach()
    blocks = fold_weight_2d(case.weight).double().chunk(groups, dim=1)
    fits = fold_weight_2d(w_hat).double().chunk(groups, dim=1)
    for block, fit in zip(blocks, fits, strict=True):
        discarded = torch.linalg.svdvals(block)[rank:].square().sum().sqrt()
        assert float((block - fit).detach().norm()) == pytest.approx(
            float(discarded), rel=1e-5, abs=1e-6
        )
        assert int(torch.linalg.matrix_rank(fit, rtol=1e-5)) <= rank


def _proxy_and_bound(weight: torch.Tensor, scheme: Grouped) -> tuple[float, float]:
    """The reference code's error (no sqrt(k)) and the paper's bound, from a dense SVD."""
    top = _operator_norm(weight)
    blocks = fold_weight_2d(weight).double().chunk(scheme.groups, dim=1)
    values = [torch.linalg.svdvals(b) for b in blocks]
    largest = max(float(s[scheme.rank]) if scheme.rank < s.numel() else 0.0 for s in values)
    return largest / top, math.sqrt(scheme.groups) * largest / top


def _check_error_between_proxy_and_bound(weight: torch.Tensor, spec: LayerSpec, scheme) -> None:
    w_hat = scheme.compress(weight, None, spec.with_channels(bias=False)).reconstruct()
    measured = _operator_norm(w_hat.double() - weight.double()) / _operator_norm(weight)
    proxy, bound = _proxy_and_bound(weight, scheme)
    assert scheme.error_bound(weight) == pytest.approx(bound, rel=1e-12)
    # float32 factors: the measured error may exceed the exact one by rounding (~1e-6 relative)
    assert proxy - 1e-5 <= measured <= bound + 1e-5, (spec, scheme, proxy, measured, bound)


@pytest.mark.parametrize("name", list(SPECS))
def test_measured_error_lies_between_the_proxy_and_the_bound(name: str) -> None:
    case = CASES[name]
    for groups in divisors(case.spec.in_features):
        for rank in range(1, Grouped(groups, 1).full_rank(case.spec) + 1):
            _check_error_between_proxy_and_bound(case.weight, case.spec, Grouped(groups, rank))


@pytest.fixture
def one_thread():
    """Hundreds of small SVDs run far faster on one thread (and a loaded machine's threads
    contend: 3 s on one thread against 99 s on two, measured on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model_name", ["mnist-resnet20", "mnist1d-cnn"])
def test_the_bound_holds_on_every_layer_of_the_benchmark_models(
    model_name: str, one_thread
) -> None:
    """Every group count of every layer (real, BatchNorm-folded weights), at a quarter of the
    group's full rank; the bound itself is checked against a dense SVD above."""
    work, _, discovery, _ = prepare(create_model(model_name))
    for layer in discovery.layers:
        weight, _ = get_weight(work, layer.name)
        top = spectral_norm(weight)
        for groups in divisors(layer.spec.in_features):
            scheme = Grouped(groups, max(1, Grouped(groups, 1).full_rank(layer.spec) // 4))
            w_hat = scheme.compress(weight, None, layer.spec.with_channels(bias=False))
            measured = spectral_norm(w_hat.reconstruct().detach() - weight) / top
            bound = scheme.error_bound(weight)
            assert bound / math.sqrt(groups) - 1e-5 <= measured <= bound + 1e-5, (layer, scheme)


def test_a_rank_at_least_the_groups_rank_has_no_error() -> None:
    case = CASES["conv2d-same"]  # 3 outputs: every group has rank at most 3
    scheme = Grouped(2, 3)
    assert scheme.error_bound(case.weight) == 0.0
    w_hat = scheme.compress(case.weight, case.bias, case.spec).reconstruct()
    torch.testing.assert_close(w_hat, case.weight, rtol=1e-5, atol=1e-5)


def _equivalent_float_ops(module: GroupedLayer, spec: LayerSpec) -> nn.Module:
    """The same computation as plain torch layers: a grouped conv, then a 1x1 conv."""
    k, j = module.groups, module.rank
    first = nn.Conv2d(
        spec.in_features,
        k * j,
        spec.kernel_size,
        spec.stride,
        spec.padding,
        spec.dilation,
        groups=k,
        bias=False,
    )
    second = nn.Conv2d(k * j, spec.out_features, 1, bias=spec.bias)
    with torch.no_grad():
        first.weight.copy_(module.v.view(first.weight.shape))
        second.weight.copy_(module.u.view(second.weight.shape))
        if spec.bias:
            second.bias.copy_(module.bias)
    return nn.Sequential(first, second)


def test_a_conv_layer_runs_as_a_grouped_conv_then_a_pointwise_conv() -> None:
    case = CASES["conv2d-dilated"]
    module = Grouped(2, 3).compress(case.weight, case.bias, case.spec)
    reference = _equivalent_float_ops(module, case.spec)
    with torch.no_grad():
        torch.testing.assert_close(module(case.x), reference(case.x), rtol=1e-6, atol=1e-6)
    assert macs(module, case.x) == macs(reference, case.x)
    positions = module(case.x).numel() // case.spec.out_features
    # j (f k + c kernel) per output position: 3 * (7 * 2 + 4 * 9)
    assert macs(module, case.x) == positions * 3 * (7 * 2 + 4 * 9)


def test_a_linear_layer_is_block_diagonal_then_dense() -> None:
    case = CASES["linear"]  # 6 x 20
    module = Grouped(4, 2).compress(case.weight, case.bias, case.spec)
    blocks = torch.block_diag(*module.v.view(4, 2, 5))  # (8, 20)
    with torch.no_grad():
        expected = nn.functional.linear(case.x @ blocks.T, module.u, module.bias)
        torch.testing.assert_close(module(case.x), expected, rtol=1e-6, atol=1e-6)
    assert macs(module, case.x) == case.x.shape[0] * (8 * 5 + 6 * 8)


def test_storage_formula() -> None:
    spec = LayerSpec("conv2d", 20, 6, (3, 3))
    assert Grouped(3, 4).storage_bits(spec) == 32 * 4 * (20 * 3 + 6 * 9)
    assert Grouped(2, 1).storage_bits(LayerSpec("linear", 4, 6)) == 32 * (4 * 2 + 6)


def test_groups_must_divide_the_input_channels() -> None:
    spec = LayerSpec("conv2d", 20, 6, (3, 3))
    with pytest.raises(
        ConfigError,
        match=r"groups=4 does not divide .* 6 input channels; use one "
        r"of \[1, 2, 3, 6\]",
    ):
        Grouped(4, 1).check(spec)
    with pytest.raises(ConfigError, match="does not divide"):
        Grouped(4, 1).storage_bits(spec)


def test_rank_above_a_groups_full_rank_is_refused() -> None:
    spec = LayerSpec("conv2d", 20, 6, (3, 3))  # 3 groups: 20 x 18 blocks, full rank 18
    Grouped(3, 18).check(spec)
    with pytest.raises(
        ConfigError, match=r"Grouped.rank=19 exceeds the full rank 18 .* use 1\.\.18"
    ):
        Grouped(3, 19).check(spec)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "2"])
def test_invalid_fields_are_named(value) -> None:
    with pytest.raises(ConfigError, match=r"Grouped\.groups must be an int >= 1"):
        Grouped(value, 1)
    with pytest.raises(ConfigError, match=r"Grouped\.rank must be an int >= 1"):
        Grouped(1, value)


def test_string_form_and_label() -> None:
    assert parse_scheme("grouped:3:8") == Grouped(3, 8)
    assert Grouped(3, 8).label() == "grouped3r8"
    assert Grouped(3, 8).family == 3
    for text in ["grouped", "grouped:3", "grouped:3:8:1", "grouped:x:2", "grouped:0:2"]:
        with pytest.raises(ConfigError):
            parse_scheme(text)
