"""LowRank: Eckart-Young error, full rank is exact, factor constructor, rank checks, storage; the
whitened fit's discarded energy against the measured output error; hostile ranks; quantized
factors (storage, the re-solved left factor, the error against the float factors)."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, calibrated_case

from allot.discover import LayerSpec, fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import build_float_layer, dense_weight
from allot.modules.lowrank import LowRankLayer, QuantizedLowRankLayer
from allot.profile.activations import damped_cholesky
from allot.schemes import LowRank, Quant, parse_scheme
from allot.schemes.lowrank import Whitened, least_squares_left, svd_factors
from allot.schemes.steer import DAMPING
from allot.stats import LayerStats

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


# --- whitened fit -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_whitened_discarded_energy_is_the_measured_output_error(spec: LayerSpec) -> None:
    """sum_{i>r} s_i^2 of W S equals the mean squared output error on the calibration inputs
    (measured by running both layers) plus the damping times |D|^2."""
    case = calibrated_case(spec)
    stats = case.profile.inputs()
    whitened = Whitened.of(fold_weight_2d(case.weight), stats)
    full = min(spec.out_features, spec.fan_in)
    float_layer = build_float_layer(spec, case.weight, case.bias)
    for rank in range(1, full):
        layer = LowRank(rank, "whitened").compress(case.weight, case.bias, spec, case.profile)
        with torch.no_grad():
            difference = (layer(case.x) - float_layer(case.x)).double()
        # one row per output position: (N, out, *positions) -> (N * positions, out)
        rows = difference.movedim(1, -1).reshape(-1, spec.out_features)
        measured = float(rows.pow(2).sum()) / stats.samples
        delta = (dense_weight(layer).double() - case.weight.double()).pow(2).sum()
        damped = measured + whitened.damping * float(delta.detach())
        assert rows.shape[0] == stats.samples
        assert whitened.discarded(rank) == pytest.approx(damped, rel=1e-4, abs=1e-7)


def test_whitened_truncation_has_the_least_damped_output_error() -> None:
    """No rank-r weight has a smaller tr(D (M + lam I) D'): not the plain SVD, not the whitened
    factors nudged in random directions."""
    spec = SPECS["conv2d-dilated"]
    case = calibrated_case(spec, seed=3)
    stats = case.profile.inputs()
    whitened = Whitened.of(fold_weight_2d(case.weight), stats)
    moment = stats.input_cov / stats.samples + whitened.damping * torch.eye(spec.fan_in).double()
    w = fold_weight_2d(case.weight).double()

    def damped_error(product: torch.Tensor) -> float:
        d = product - w
        return float(((d @ moment) * d).sum())

    rank = 3
    u, v = whitened.factors(rank)
    best = damped_error(u @ v)
    assert best == pytest.approx(whitened.discarded(rank), rel=1e-9)
    pu, pv = svd_factors(w, rank)
    assert damped_error(pu.double() @ pv.double()) > best
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        du = 1e-3 * torch.randn(u.shape, generator=g, dtype=torch.float64)
        dv = 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        assert damped_error((u + du) @ (v + dv)) >= best


def test_whitened_refit_is_the_truncation_of_the_target_under_new_statistics() -> None:
    spec = SPECS["linear"]
    case = calibrated_case(spec)
    x = torch.randn(50, spec.in_features, generator=torch.Generator().manual_seed(4))
    stats = LayerStats((x.T @ x).double(), 50)
    target = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(5))
    scheme = LowRank(2, "whitened")
    assert scheme.refits and not LowRank(2).refits
    layer = scheme.refit(target, case.bias, spec, stats)
    u, v = Whitened.of(target, stats).factors(2)
    torch.testing.assert_close(layer.reconstruct().double(), u @ v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot be re-fitted"):
        LowRank(2).refit(target, case.bias, spec, stats)


def test_whitened_needs_the_profile_and_stores_what_plain_stores() -> None:
    spec = SPECS["conv2d-dilated"]
    case = calibrated_case(spec)
    with pytest.raises(ConfigError, match="fits to calibration data"):
        LowRank(2, "whitened").compress(case.weight, case.bias, spec)
    whitened = LowRank(2, "whitened").compress(case.weight, case.bias, spec, case.profile)
    plain = LowRank(2).compress(case.weight, case.bias, spec)
    assert {k: t.shape for k, t in whitened.state_dict().items()} == {
        k: t.shape for k, t in plain.state_dict().items()
    }
    assert LowRank(2, "whitened").storage_bits(spec) == LowRank(2).storage_bits(spec)


def test_the_c_step_of_either_fit_is_the_truncated_svd_and_needs_no_data() -> None:
    # LC's C step minimises the plain weight error: the truncated SVD, for the whitened fit too
    # (which refused to fit without a profile before, so `--refine lc` failed on its plans).
    spec = SPECS["conv2d-dilated"]
    case = calibrated_case(spec)
    target = case.weight + 0.1 * torch.randn(
        case.weight.shape, generator=torch.Generator().manual_seed(3)
    )
    best = LowRank(2).compress(target, case.bias, spec)
    for scheme in (LowRank(2), LowRank(2, "whitened")):
        projected = scheme.project(target, case.bias, spec)
        assert torch.allclose(dense_weight(projected), dense_weight(best), atol=1e-6)
        error = float(
            fold_weight_2d(dense_weight(projected).detach() - target).double().pow(2).sum()
        )
        values = torch.linalg.svdvals(fold_weight_2d(target).double())
        assert error == pytest.approx(float(values[2:].pow(2).sum()), rel=1e-5)


# --- hostile ranks ----------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 10, 10**30])
def test_hostile_ranks_are_refused_in_one_line(rank: int) -> None:
    with pytest.raises(ConfigError) as caught:
        LowRank(rank).check(SPEC)
        LowRank(rank, "whitened").storage_bits(SPEC)
    message = str(caught.value)
    assert "\n" not in message and "LowRank.rank" in message and len(message) < 200


@pytest.mark.parametrize("text", ["rank:0", "rank:-3", "rank:2:sketchy", f"rank:{'9' * 5000}"])
def test_hostile_string_forms_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scheme(text)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_huge_rank_in_a_string_parses_and_then_fails_the_layer_check() -> None:
    scheme = parse_scheme(f"rank:{10**30}:whitened")
    with pytest.raises(ConfigError, match="exceeds the layer's full rank 9"):
        scheme.check(SPEC)


def test_labels_and_forms_of_the_fits() -> None:
    assert LowRank(4).label() == "rank4" and LowRank(4, "whitened").label() == "rank4-whitened"
    assert parse_scheme("rank:4:whitened") == LowRank(4, "whitened")
    assert parse_scheme("rank:4:plain") == LowRank(4)
    with pytest.raises(ConfigError, match=r"LowRank\.fit must be one of"):
        LowRank(4, "sketchy")


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


# --- quantized factors ------------------------------------------------------------------------


def test_quantized_factors_store_quant_bits_of_each_factor() -> None:
    # per-row float16 scale and offset for bits >= 2, a scale alone for the scaled sign
    out, fan_in, rank = 9, 14, 3
    for bits, tables in ((4, 32), (3, 32), (1, 16)):
        codes = -(-rank * fan_in * bits // 8) + -(-out * rank * bits // 8)
        expected = 8 * codes + tables * (rank + out)
        assert LowRank(rank, bits=bits).storage_bits(SPEC) == expected
        assert LowRank(rank, "whitened", bits).storage_bits(SPEC) == expected


def test_left_factor_is_the_least_squares_optimum_under_the_moment() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 14, generator=g, dtype=torch.float64)
    v = torch.randn(3, 14, generator=g, dtype=torch.float64)
    x = torch.randn(40, 14, generator=g, dtype=torch.float64)
    moment = x.T @ x / 40 + 0.01 * torch.eye(14, dtype=torch.float64)
    u = least_squares_left(w, v, moment)
    # the normal equations of tr((W - U V) A (W - U V)') in U hold ...
    torch.testing.assert_close((w - u @ v) @ moment @ v.T, torch.zeros(9, 3, dtype=torch.float64))
    # ... and the whitened problem solved by lstsq gives the same U
    root = torch.linalg.cholesky(moment)
    reference = torch.linalg.lstsq((v @ root).T, (w @ root).T).solution.T
    torch.testing.assert_close(u, reference)


def _damped_error(layer, case, stats) -> float:
    """tr(D (M + lam I) D') of a layer's weight against the case's float weight."""
    _, lam = damped_cholesky(stats, DAMPING)
    moment = stats.input_cov / stats.samples + lam * torch.eye(stats.input_cov.shape[0])
    d = fold_weight_2d(dense_weight(layer).detach() - case.weight).double()
    return float(((d @ moment) * d).sum())


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_quantized_factors_approach_the_float_factors_as_bits_grow(spec: LayerSpec) -> None:
    """8-bit factors lose little next to the float factors' (the truncation's) damped output
    error; 2-bit factors lose more than 8-bit ones."""
    case = calibrated_case(spec, seed=2)
    stats = case.profile.inputs()
    rank = max(1, min(spec.out_features, spec.fan_in) // 2)
    error = {
        bits: _damped_error(
            LowRank(rank, "whitened", bits).compress(case.weight, case.bias, spec, case.profile),
            case,
            stats,
        )
        for bits in (None, 8, 2)
    }
    scale = _damped_error(
        LowRank(1, "whitened").compress(case.weight, case.bias, spec, case.profile), case, stats
    )
    assert error[8] <= error[None] + 1e-3 * scale
    assert error[2] > error[8]


def test_quantized_factors_hold_the_re_solved_left_factor() -> None:
    """Plain fit: V rounded to nearest, U the least squares for that V, then rounded: U's
    codes are those of rounding the least-squares U (packed codes against the unpacked)."""
    spec = SPECS["conv2d-dilated"]
    case = calibrated_case(spec)
    layer = LowRank(3, bits=4).compress(case.weight, case.bias, spec)
    assert isinstance(layer, QuantizedLowRankLayer)
    v_hat = layer.first.reconstruct().reshape(3, spec.fan_in).double()
    w = fold_weight_2d(case.weight).double()
    u = least_squares_left(w, v_hat, torch.eye(spec.fan_in, dtype=torch.float64))
    rounded = Quant(4).project(u.float(), None, layer.second.spec)
    assert torch.equal(layer.second.unpacked_codes(), rounded.unpacked_codes())
    u_hat, v = layer.factors()
    torch.testing.assert_close(dense_weight(layer), (u_hat @ v).view(spec.weight_shape))


def test_quantized_factors_re_fit_and_select_keep_their_bits() -> None:
    spec = SPECS["linear"]
    case = calibrated_case(spec)
    stats = case.profile.inputs()
    scheme = LowRank(2, "whitened", 4)
    refitted = scheme.refit(case.weight, case.bias, spec, stats)
    compressed = scheme.compress(case.weight, case.bias, spec, case.profile)
    assert torch.equal(dense_weight(refitted), dense_weight(compressed))
    chosen = scheme.select(case.weight, spec, 1e-6)
    assert (chosen.fit, chosen.bits) == ("whitened", 4)
    assert isinstance(scheme.project(case.weight, case.bias, spec), QuantizedLowRankLayer)


def test_quantized_factor_forms_and_hostile_bits() -> None:
    assert LowRank(4, "whitened", 4).label() == "rank4-whitened-q4"
    assert LowRank(4, bits=2).label() == "rank4-q2"
    assert parse_scheme("rank:4:whitened:q4") == LowRank(4, "whitened", 4)
    assert parse_scheme("rank:4:q3") == LowRank(4, bits=3)
    for bits in (0, 9, True, 2.5):
        with pytest.raises(ConfigError, match=r"LowRank\.bits must be an int in 1\.\.8"):
            LowRank(4, bits=bits)
    for text in ("rank:4:q0", "rank:4:qx", "rank:4:whitened:q4:q4", "rank:q4"):
        with pytest.raises(ConfigError) as caught:
            parse_scheme(text)
        assert "\n" not in str(caught.value)
