"""Steered quantization: never worse than round-to-nearest on the predicted loss change, and
really better on a layer whose loss is exactly quadratic."""

import pytest
import torch
from conftest import SPECS, make_case

from allot.discover import fold_weight_2d
from allot.exceptions import ConfigError
from allot.modules.base import dense_weight
from allot.modules.quant import GRIDS, dequantize
from allot.schemes import Quant
from allot.schemes.grid import quantize_rtn
from allot.schemes.steer import grid_least_squares, steer
from allot.stats import LayerStats


def _problem(seed: int = 0, out: int = 12, fan_in: int = 24):
    """A weight and strongly correlated inputs (a few dominant directions)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, fan_in, generator=g) / fan_in**0.5
    basis = torch.randn(fan_in, 4, generator=g, dtype=torch.float64)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64) @ basis.T
    x += 0.05 * torch.randn(500, fan_in, generator=g, dtype=torch.float64)
    return w, LayerStats(x.T @ x, 500)


def _objective(w, codes, grid, stats):
    """f_r = d_r' M d_r per row, as steer.py defines it, on the stored (float32) weight."""
    d = dequantize(codes, grid).double() - w.double()
    return ((d @ (stats.input_cov / stats.samples)) * d).sum(1)


def _zero_is_on_the_grid(grid) -> bool:
    """Every group's zero point, as a code, dequantizes to exactly 0.0."""
    zero = grid.zero_points()
    return bool((dequantize(zero, grid) == 0).all())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("bits", "group"), [(1, None), (2, None), (3, 8), (4, None)])
def test_every_row_predicts_no_more_damage_than_round_to_nearest(bits, group, grid) -> None:
    w, stats = _problem()
    groups = 1 if group is None else w.shape[1] // group
    codes, fitted = steer(w, bits, groups, grid, stats)
    f_steered = _objective(w, codes, fitted, stats)
    f_nearest = _objective(w, *quantize_rtn(w, bits, group, grid), stats)
    assert (f_steered <= f_nearest * (1 + 1e-9) + 1e-12).all()
    assert f_steered.sum() < 0.7 * f_nearest.sum()  # correlated inputs leave much to steer
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0
    assert int(codes.max()) <= (1 if bits == 1 else 2**bits - 1)
    assert fitted.scale.dtype == torch.float16
    assert fitted.kind == ("symmetric" if bits == 1 else grid)
    if bits > 1 and grid != "float-offset":
        assert _zero_is_on_the_grid(fitted)


def test_uncorrelated_inputs_leave_round_to_nearest_almost_alone() -> None:
    # With M = I the objective is the weight error, which round-to-nearest already minimises on
    # its grid; steering may only clip the grid where that lowers the error.
    w, _ = _problem(seed=1)
    identity = LayerStats(torch.eye(w.shape[1], dtype=torch.float64), 1)
    f_steered = _objective(w, *steer(w, 4, 1, "float-offset", identity), identity)
    f_nearest = _objective(w, *quantize_rtn(w, 4, None, "float-offset"), identity)
    assert (f_steered <= f_nearest + 1e-12).all()
    assert f_steered.sum() > 0.5 * f_nearest.sum()


def test_steering_lowers_the_output_error_of_a_layer_on_its_own_inputs() -> None:
    # The squared output error on the calibration inputs is the loss change of a layer trained to
    # reproduce its float outputs: exactly quadratic, with no gradient term.
    case = make_case(SPECS["linear-nobias"], seed=3)
    profile = case.profile
    x = next(profile.profile.data.batches())[0]

    def output_error(weight: torch.Tensor) -> float:
        return float((x @ (weight - case.weight).T).pow(2).sum() / x.shape[0])

    for bits in (1, 2, 3, 4):
        for grid in GRIDS:
            nearest, steered = (
                output_error(
                    dense_weight(
                        Quant(bits, None, r, grid).compress(case.weight, None, case.spec, profile)
                    )
                )
                for r in ("nearest", "steered")
            )
            assert steered < nearest


def test_steered_quant_needs_a_profile_and_parses() -> None:
    case = make_case(SPECS["linear"])
    with pytest.raises(ConfigError, match="calibration data"):
        Quant(3, rounding="steered").compress(case.weight, case.bias, case.spec)
    with pytest.raises(ConfigError, match="rounding"):
        Quant(3, rounding="adaround")
    scheme = Quant(3, 4, "steered")
    assert scheme.label() == "quant3g4-steered"
    assert scheme.storage_bits(case.spec) == Quant(3, 4).storage_bits(case.spec)
    assert fold_weight_2d(case.weight).shape == (6, 20)


def test_grid_least_squares_solves_the_dense_weighted_least_squares_problem() -> None:
    # Reference: the (fan_in x 2 groups) design of every row written out, solved by lstsq on
    # M^1/2 A theta = M^1/2 w.
    w, stats = _problem(seed=4)
    w = w.double()
    second = stats.input_cov / stats.samples
    groups, size = 3, w.shape[1] // 3
    codes = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(0)).double()
    offset, scale = grid_least_squares(codes, w, groups, second)
    _, scale_only = grid_least_squares(codes - 1.5, w, groups, second, offsets=False)
    root = torch.linalg.cholesky(second).T  # second = root' root
    for row in range(w.shape[0]):
        design = torch.zeros(w.shape[1], 2 * groups, dtype=torch.float64)
        for g in range(groups):
            design[g * size : (g + 1) * size, g] = 1.0
            design[g * size : (g + 1) * size, groups + g] = codes[row, g * size : (g + 1) * size]
        theta = torch.linalg.lstsq(root @ design, root @ w[row]).solution
        torch.testing.assert_close(offset[row], theta[:groups], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(scale[row], theta[groups:], rtol=1e-7, atol=1e-9)
        shifted = design[:, groups:] - 1.5 * design[:, :groups]  # codes - 1.5 in their group
        theta = torch.linalg.lstsq(root @ shifted, root @ w[row]).solution
        torch.testing.assert_close(scale_only[row], theta, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("bits", "group"), [(2, None), (3, 8), (4, None)])
def test_refit_lowers_every_row_and_keeps_the_grid_family(bits, group, grid) -> None:
    w, stats = _problem(seed=5)
    groups = 1 if group is None else w.shape[1] // group
    plain = _objective(w, *steer(w, bits, groups, grid, stats), stats)
    codes, fitted = steer(w, bits, groups, grid, stats, refit=True)
    refitted = _objective(w, codes, fitted, stats)
    assert (refitted <= plain * (1 + 1e-9) + 1e-12).all()
    assert refitted.sum() < 0.9 * plain.sum()  # steered codes want another grid than RTN's
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) <= int(codes.max()) < 2**bits
    assert fitted.kind == grid and fitted.scale.dtype == torch.float16
    assert (fitted.scale > 0).all()
    if grid == "float-offset":
        assert fitted.offset.dtype == torch.float16
    else:  # the zero point stays an integer in the code range, and zero stays on the grid
        assert _zero_is_on_the_grid(fitted)
    if grid == "zero-point":
        assert fitted.zero.dtype == torch.int64
        assert int(fitted.zero.min()) >= 0 and int(fitted.zero.max()) < 2**bits


def test_refit_leaves_scaled_sign_grids_alone() -> None:
    w, stats = _problem(seed=5)
    codes, fitted = steer(w, 1, 1, "zero-point", stats)
    refit_codes, refitted = steer(w, 1, 1, "zero-point", stats, refit=True)
    assert torch.equal(codes, refit_codes) and torch.equal(fitted.scale, refitted.scale)
    assert fitted.kind == refitted.kind == "symmetric"
