"""Grouped (ALDS): k = 1 is plain SVD, the module computes W_hat x, each group is its own best
rank-j fit, the error lies between the reference code's proxy and the paper's bound (on every
layer of the benchmark models too), storage and MACs are what the two operations hold and do.
The whitened fit: its reported output error is the measured one, k = 1 is LowRank's whitened fit,
its sweeps never raise the error and converge to a stationary point (autograd), it lies between
the whitened rank-k j truncation and the plain grouped fit, and its plans round-trip. Quantized
factors: storage, one group is quantized LowRank, U re-solved for the block-diagonal V."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import SPECS, LayerCase, calibrated_case, make_case
from torch import nn

from allot.api import prepare
from allot.budget import Budget
from allot.discover import LayerSpec, fold_weight_2d, get_weight
from allot.errors import spectral_norm
from allot.evaluate import macs
from allot.exceptions import ConfigError
from allot.modules.base import build_float_layer, dense_weight
from allot.modules.grouped import GroupedLayer, QuantizedGroupedLayer
from allot.plan import LayerPlan, Plan
from allot.schemes import Grouped, LowRank, Quant, parse_scheme
from allot.schemes.grouped import (
    SWEEPS,
    TOLERANCE,
    GroupedWhitening,
    _whitenings,
    divisors,
)
from allot.schemes.lowrank import Whitened, least_squares_left
from allot.stats import LayerStats
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


# --- whitened fit -----------------------------------------------------------------------------

WHITENED = [(2, 1), (2, 2), (4, 1)]  # 2 and 4 divide every case's input channels


def _whitening(case: LayerCase, groups: int) -> GroupedWhitening:
    return GroupedWhitening.of(fold_weight_2d(case.weight), case.profile.inputs(), groups)


def _damped_output_error(whitening: GroupedWhitening, product: torch.Tensor) -> torch.Tensor:
    residual = product - whitening.weight
    return ((residual @ whitening.moment) * residual).sum()


def _product(u: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    rank = u.shape[1] // groups
    blocks = torch.einsum(
        "okj,kjm->okm", u.view(u.shape[0], groups, rank), v.view(groups, rank, -1)
    )
    return blocks.reshape(u.shape[0], -1)


@pytest.mark.parametrize("name", list(SPECS))
def test_whitened_output_error_is_what_the_fit_reports(name: str) -> None:
    """The fit's last error, tr(D (M + lam I) D'), equals the mean squared output error of the
    compressed layer on the calibration inputs (measured by running both layers) plus lam |D|^2."""
    spec = SPECS[name]
    case = calibrated_case(spec, seed=3)
    stats = case.profile.inputs()
    float_layer = build_float_layer(spec, case.weight, case.bias)
    for groups, rank in WHITENED:
        layer = Grouped(groups, rank, "whitened").compress(
            case.weight, case.bias, spec, case.profile
        )
        with torch.no_grad():
            difference = (layer(case.x) - float_layer(case.x)).double()
        rows = difference.movedim(1, -1).reshape(-1, spec.out_features)
        assert rows.shape[0] == stats.samples
        measured = float(rows.pow(2).sum()) / stats.samples
        delta = float((dense_weight(layer).detach().double() - case.weight.double()).pow(2).sum())
        whitening = _whitening(case, groups)
        reported = whitening.fit(rank)[2][-1]
        assert reported == pytest.approx(measured + whitening.damping * delta, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", list(SPECS))
def test_one_whitened_group_is_low_rank_whitened(name: str) -> None:
    case = calibrated_case(SPECS[name], seed=3)
    for rank in (1, 2, 3):
        grouped = Grouped(1, rank, "whitened").compress(
            case.weight, case.bias, case.spec, case.profile
        )
        low = LowRank(rank, "whitened").compress(case.weight, case.bias, case.spec, case.profile)
        assert torch.equal(grouped.u, low.u) and torch.equal(grouped.v, low.v)


@pytest.mark.parametrize("name", list(SPECS))
def test_the_sweeps_never_increase_the_output_error(name: str) -> None:
    case = calibrated_case(SPECS[name], seed=3)
    for groups, rank in WHITENED:
        whitening = _whitening(case, groups)
        u, v, errors = whitening.fit(rank, sweeps=25, tolerance=0.0)
        assert len(errors) == 25
        for before, after in itertools.pairwise(errors):
            assert after <= before * (1 + 1e-12)
        assert errors[-1] == pytest.approx(
            float(_damped_output_error(whitening, _product(u, v, groups))), rel=1e-12
        )
        # a run of fewer sweeps is this run's beginning; the default stops once a sweep gains
        # less than TOLERANCE of the error
        assert whitening.fit(rank, sweeps=5, tolerance=0.0)[2] == errors[:5]
        default = whitening.fit(rank)[2]
        assert default == errors[: len(default)]
        assert len(default) == SWEEPS or default[-2] - default[-1] <= TOLERANCE * default[-2]


@pytest.mark.parametrize("name", ["conv1d-strided", "conv2d-dilated"])
def test_the_converged_fit_is_a_stationary_point(name: str) -> None:
    """Autograd reference: where the sweeps stop moving, the output error's gradient in every
    group's factors vanishes (each group's step is that group's exact optimum)."""
    case = calibrated_case(SPECS[name], seed=3)
    whitening = _whitening(case, 2)
    u, v, _ = whitening.fit(1, sweeps=200, tolerance=0.0)
    u, v = u.clone().requires_grad_(), v.clone().requires_grad_()
    error = _damped_output_error(whitening, _product(u, v, 2))
    grad_u, grad_v = torch.autograd.grad(error, (u, v))
    scale = float(error.detach()) ** 0.5 * float(whitening.moment.norm()) ** 0.5
    assert float(grad_u.norm()) <= 1e-6 * scale * float(u.detach().norm())
    assert float(grad_v.norm()) <= 1e-6 * scale * float(v.detach().norm())


@pytest.mark.parametrize("name", list(SPECS))
def test_no_grouped_fit_beats_the_whitened_rank_k_j_truncation(name: str) -> None:
    """k groups of rank j make a weight of rank at most k j, so the whitened truncation at rank
    k j (the least output error over all such weights) bounds every grouped fit's from below;
    the whitened grouped fit lies between it and the plain grouped fit's error."""
    case = calibrated_case(SPECS[name], seed=3)
    whole = Whitened.of(fold_weight_2d(case.weight), case.profile.inputs())
    for groups, rank in WHITENED:
        whitening = _whitening(case, groups)
        error = whitening.fit(rank)[2][-1]
        plain = Grouped(groups, rank).compress(case.weight, case.bias, case.spec)
        plain_error = float(
            _damped_output_error(whitening, fold_weight_2d(dense_weight(plain).detach()).double())
        )
        assert whole.discarded(groups * rank) <= error * (1 + 1e-9)
        assert error <= plain_error * (1 + 1e-6)


def test_whitened_fit_is_deterministic() -> None:
    case = calibrated_case(SPECS["conv2d-dilated"], seed=3)
    scheme = Grouped(2, 2, "whitened")
    first = scheme.compress(case.weight, case.bias, case.spec, case.profile)
    _whitenings.clear()  # fit again from scratch, not from the remembered SVDs
    again = scheme.compress(case.weight, case.bias, case.spec, case.profile)
    assert torch.equal(first.u, again.u) and torch.equal(first.v, again.v)


def test_whitened_needs_the_profile_and_refits_to_new_statistics() -> None:
    spec = SPECS["linear"]
    case = calibrated_case(spec, seed=3)
    scheme = Grouped(2, 2, "whitened")
    with pytest.raises(ConfigError, match="fits to calibration data"):
        scheme.compress(case.weight, case.bias, spec)
    assert scheme.refits and not Grouped(2, 2).refits
    x = torch.randn(50, spec.in_features, generator=torch.Generator().manual_seed(4))
    stats = LayerStats((x.T @ x).double(), 50)
    target = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(5))
    layer = scheme.refit(target, case.bias, spec, stats)
    u, v, _ = GroupedWhitening.of(target, stats, 2).fit(2)
    torch.testing.assert_close(layer.reconstruct().double(), _product(u, v, 2))
    with pytest.raises(ConfigError, match="cannot be re-fitted"):
        Grouped(2, 2).refit(target, case.bias, spec, stats)


def test_the_c_step_and_the_bound_are_the_plain_fits() -> None:
    case = calibrated_case(SPECS["conv2d-dilated"], seed=3)
    plain = Grouped(2, 2).compress(case.weight, case.bias, case.spec)
    projected = Grouped(2, 2, "whitened").project(case.weight, case.bias, case.spec)
    assert torch.equal(projected.u, plain.u) and torch.equal(projected.v, plain.v)
    assert Grouped(2, 2, "whitened").error_bound(case.weight) is None
    assert Grouped(2, 2, "whitened").storage_bits(case.spec) == Grouped(2, 2).storage_bits(
        case.spec
    )


def test_whitened_forms_labels_and_plans() -> None:
    scheme = Grouped(3, 8, "whitened")
    assert parse_scheme("grouped:3:8:whitened") == scheme
    assert scheme.label() == "grouped3r8-whitened" and scheme.family == 3
    with pytest.raises(ConfigError, match=r"Grouped\.fit must be one of"):
        Grouped(3, 8, "pca")
    for text in ["grouped:3:8:pca", "grouped:3:8:whitened:1"]:
        with pytest.raises(ConfigError):
            parse_scheme(text)
    spec = LayerSpec("conv2d", 20, 6, (3, 3))
    plan = Plan(
        model="test",
        method="alds-knapsack-whitened",
        error_model="curvature",
        budget=Budget("ratio", 2.0),
        layers=[LayerPlan("conv", spec, scheme, 0.5)],
    )
    again = Plan.loads(plan.dumps())
    assert again.layers[0].scheme == scheme and again.dumps() == plan.dumps()
    # a plan written before the fit existed names no fit: it loads as the plain fit
    old = plan.to_json()
    old["layers"][0]["scheme"] = {"kind": "grouped", "groups": 3, "rank": 8}
    assert Plan.from_json(old).layers[0].scheme == Grouped(3, 8, "plain")


# --- quantized factors ------------------------------------------------------------------------


def test_quantized_factors_store_quant_bits_of_the_stacked_v_and_of_u() -> None:
    spec = LayerSpec("conv2d", 6, 4, (3, 3))  # fan_in 36, 2 groups of 18
    groups, rank, bits = 2, 3, 4
    width = groups * rank
    codes = -(-width * 18 * bits // 8) + -(-6 * width * bits // 8)
    scheme = Grouped(groups, rank, bits=bits)
    assert scheme.storage_bits(spec) == 8 * codes + 32 * (width + 6)
    assert scheme.storage_bits(spec) < Grouped(groups, rank).storage_bits(spec) / 4


@pytest.mark.parametrize("name", list(SPECS))
def test_one_quantized_group_is_quantized_low_rank(name: str) -> None:
    spec = SPECS[name]
    case = calibrated_case(spec, seed=4)
    rank = max(1, min(spec.out_features, spec.fan_in) // 2)
    for fit, profile in (("plain", None), ("whitened", case.profile)):
        grouped = Grouped(1, rank, fit, 3).compress(case.weight, case.bias, spec, profile)
        factored = LowRank(rank, fit, 3).compress(case.weight, case.bias, spec, profile)
        torch.testing.assert_close(dense_weight(grouped), dense_weight(factored))


def test_quantized_grouped_u_is_re_solved_for_the_block_diagonal_v() -> None:
    """Plain fit in 2 groups: U's codes are those of rounding the least-squares U for the
    rounded, block-diagonal V (packed codes against the unpacked)."""
    spec = LayerSpec("conv2d", 6, 4, (3, 3))
    case = make_case(spec, seed=5)
    layer = Grouped(2, 2, bits=4).compress(case.weight, case.bias, spec)
    assert isinstance(layer, QuantizedGroupedLayer)
    v_hat = layer.first.reconstruct().reshape(4, 18).double()
    expanded = torch.block_diag(*v_hat.chunk(2))
    w = fold_weight_2d(case.weight).double()
    u = least_squares_left(w, expanded, torch.eye(36, dtype=torch.float64))
    rounded = Quant(4).project(u.float(), None, layer.second.spec)
    assert torch.equal(layer.second.unpacked_codes(), rounded.unpacked_codes())
    u_hat, _ = layer.factors()
    product = u_hat.double() @ expanded
    torch.testing.assert_close(
        fold_weight_2d(dense_weight(layer)).double(), product, rtol=1e-5, atol=1e-6
    )


def test_quantized_grouped_forms_and_hostile_bits() -> None:
    assert Grouped(2, 3, "whitened", 4).label() == "grouped2r3-whitened-q4"
    assert parse_scheme("grouped:2:3:q2") == Grouped(2, 3, bits=2)
    assert Grouped(2, 3, bits=2).kinds == "qgrouped" and Grouped(2, 3).kinds == "grouped"
    assert Grouped(2, 3, bits=2).error_bound(torch.randn(6, 4, 3, 3)) is None
    for bits in (0, 9, False):
        with pytest.raises(ConfigError, match=r"Grouped\.bits must be an int in 1\.\.8"):
            Grouped(2, 3, bits=bits)
    with pytest.raises(ConfigError):
        parse_scheme("grouped:2:3:q")
