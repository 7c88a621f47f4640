"""The stacked, blocked steered rounding (`allot.schemes.steer`) against a straightforward
reference: one candidate at a time, column by column, every rounding error and every code move
applied to all later columns at once (the algorithm as the module's docstring states it)."""

import pytest
import torch
from conftest import SPECS, make_case

import allot.schemes.quant as quant_module
from allot.modules.base import dense_weight
from allot.profile.activations import damped_cholesky
from allot.schemes import Keep, Quant
from allot.schemes import steer as steering
from allot.schemes.base import compress_all
from allot.schemes.grid import quant_grid, round_to_grid
from allot.stats import LayerStats


def reference_sequential(w, low, step, levels, second):
    """Step 2 for one candidate (low, step: (out, fan_in)): round column j, then move every later
    column by its error through the upper Cholesky factor of the damped M^-1."""
    factor, _ = damped_cholesky(LayerStats(second, 1), steering.DAMPING)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    target = w.clone()
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        varying = step[:, j] > 0
        q = torch.round((target[:, j] - low[:, j]) / torch.where(varying, step[:, j], 1.0))
        q = torch.where(varying, q, 0.0).clamp(0, levels)
        codes[:, j] = q
        error = (target[:, j] - (low[:, j] + step[:, j] * q)) / upper[j, j]
        target[:, j + 1 :] -= error[:, None] * upper[j, j + 1 :]
    return codes


def reference_refine(codes, w, low, step, levels, second):
    """Step 3 for one candidate: per column, each row's best move +-1 of its code if it lowers
    f_r = d_r' M d_r, d M updated after every column; until a sweep moves nothing."""
    codes = codes.clone()
    product = (low + step * codes - w) @ second
    for _ in range(steering.SWEEPS):
        changed = False
        for j in range(w.shape[1]):
            best_gain = torch.zeros_like(step[:, j])
            best_move = torch.zeros_like(step[:, j])
            for move in (1.0, -1.0):
                target = codes[:, j] + move
                allowed = (target >= 0) & (target <= levels) & (step[:, j] > 0)
                shift = move * step[:, j]
                gain = 2 * shift * product[:, j] + shift**2 * second[j, j]
                better = allowed & (gain < best_gain)
                best_gain = torch.where(better, gain, best_gain)
                best_move = torch.where(better, move, best_move)
            changed |= bool(best_move.any())
            codes[:, j] += best_move
            product += (best_move * step[:, j])[:, None] * second[j]
        if not changed:
            break
    return codes


def reference_steer(w, bits, groups, grid, second):
    """Steps 1-3 of `steer` for one setting, float64 weight `w`: codes (int64) and grid."""
    objective = steering._Objective(second)
    grouped = w.reshape(w.shape[0], groups, -1)
    best = None
    for clip in steering.CLIPS:
        fitted = quant_grid(grouped, bits, grid, clip)
        codes = round_to_grid(grouped, fitted).reshape(w.shape)
        value = objective(steering._dequantize(codes, fitted) - w)
        if best is None:
            best = codes, fitted, value
            continue
        better = value < best[2]
        best = (
            torch.where(better[:, None], codes, best[0]),
            best[1].select(better, fitted),
            torch.where(better, value, best[2]),
        )
    rtn, fitted, rtn_value = best
    low, step = steering._per_weight(fitted, w.shape[1])
    levels = 1 if bits == 1 else 2**bits - 1
    codes = reference_sequential(w, low, step, levels, second)
    codes = reference_refine(codes, w, low, step, levels, second)
    keep_rtn = rtn_value <= objective(low + step * codes - w)
    return torch.where(keep_rtn[:, None], rtn, codes.to(torch.int64)), fitted


def _problem(seed: int, out: int, fan_in: int):
    """A float64 weight (some rows with a constant group), and a random SPD second moment with
    a few dominant directions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, fan_in, generator=g, dtype=torch.float64) / fan_in**0.5
    w[0, : fan_in // 3] = 0.0  # a group of one value: step 0 on every grid of 3 groups
    basis = torch.randn(fan_in, 5, generator=g, dtype=torch.float64)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64) @ basis.T
    x += 0.1 * torch.randn(400, fan_in, generator=g, dtype=torch.float64)
    return w, x.T @ x / 400


def _assert_same_rounding(codes, expected, w, low, step, second):
    """Codes identical, or where a row differs (a tie broken by rounding), the same f to 1e-9."""
    differ = (codes != expected).any(-1)
    if differ.any():
        objective = steering._Objective(second)
        f = objective(low + step * codes.double() - w)[differ]
        f_ref = objective(low + step * expected.double() - w)[differ]
        torch.testing.assert_close(f, f_ref, rtol=1e-9, atol=0.0)


def _grids(seed: int, w, settings):
    """Random round-to-nearest grids of `w` for each (bits, groups, grid) setting, stacked."""
    g = torch.Generator().manual_seed(seed)
    tables = []
    for bits, groups, grid in settings:
        clip = 0.6 + 0.4 * torch.rand(w.shape[0], groups, generator=g, dtype=torch.float64)
        fitted = quant_grid(w.reshape(w.shape[0], groups, -1), bits, grid, clip)
        tables.append(steering._per_weight(fitted, w.shape[1]))
    levels = torch.tensor([1.0 if b == 1 else 2.0**b - 1 for b, _, _ in settings])
    return torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables]), levels


SETTINGS = [(1, 1, "symmetric"), (2, 3, "zero-point"), (3, 3, "float-offset"), (4, 1, "symmetric")]


@pytest.mark.parametrize(("seed", "block"), [(0, 5), (1, 32), (2, 70)])
@pytest.mark.parametrize("sparse", [0.0, 2.0])  # a block's moves on d M: by product, one by one
def test_stacked_blocked_rounding_and_refinement_equal_the_reference(
    seed, block, sparse, monkeypatch
) -> None:
    monkeypatch.setattr(steering, "SPARSE", sparse)
    w, second = _problem(seed, out=9, fan_in=69)
    low, step, levels = _grids(seed, w, SETTINGS)
    upper = steering._inverse_factor(second)
    codes = steering._sequential(w, low, step, levels, upper, block)
    for c in range(len(SETTINGS)):
        expected = reference_sequential(w, low[c], step[c], levels[c], second)
        _assert_same_rounding(codes[c], expected, w, low[c], step[c], second)
    # refinement from codes far from optimal (random, including codes on step-0 groups, which
    # must not move), so that every sweep moves many of them
    g = torch.Generator().manual_seed(seed + 10)
    start = torch.rand(codes.shape, generator=g, dtype=torch.float64) * (levels + 1)[:, None, None]
    start = start.floor().minimum(levels[:, None, None])
    refined = steering._refine(start, w, low, step, levels, steering._Objective(second), block)
    for c in range(len(SETTINGS)):
        expected = reference_refine(start[c], w, low[c], step[c], levels[c], second)
        _assert_same_rounding(refined[c], expected, w, low[c], step[c], second)
        assert (refined[c] != start[c]).sum() > 10  # the refinement really worked
    assert (step == 0).any() and torch.equal(refined[step == 0], start[step == 0])


@pytest.mark.parametrize("stack", [steering.STACK, 2 * 6 * 48])  # all at once; two at a time
def test_steer_many_equals_the_reference_for_every_setting(stack, monkeypatch) -> None:
    monkeypatch.setattr(steering, "STACK", stack)
    w, second = _problem(3, out=6, fan_in=48)
    stats = LayerStats(second * 50, 50)
    settings = [*SETTINGS, (3, 1, "float-offset"), (8, 1, "zero-point")]
    results = steering.steer_many(w, settings, stats)
    assert len(results) == len(settings)
    for (bits, groups, grid), (codes, fitted) in zip(settings, results, strict=True):
        expected, expected_grid = reference_steer(w, bits, groups, grid, second)
        assert torch.equal(fitted.scale, expected_grid.scale)
        low, step = steering._per_weight(fitted, w.shape[1])
        _assert_same_rounding(codes, expected, w, low, step, second)
        assert codes.dtype == torch.int64


def test_quant_compresses_its_steered_candidates_together_as_one_by_one(monkeypatch) -> None:
    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return steering.steer_many(*args, **kwargs)

    monkeypatch.setattr(quant_module, "steer_many", counted)
    case = make_case(SPECS["linear-nobias"], seed=2)
    schemes = [
        Quant(3, 4, "steered"),
        Keep(),
        Quant(2, None, "steered", "zero-point"),
        Quant(4),
        Quant(1, 8, "steered"),
    ]
    together = compress_all(schemes, case.weight, None, case.spec, case.profile)
    assert calls == [3]  # the three steered candidates in one call
    for scheme, module in zip(schemes, together, strict=True):
        alone = scheme.compress(case.weight, None, case.spec, case.profile)
        assert type(module) is type(alone)
        torch.testing.assert_close(dense_weight(module), dense_weight(alone), rtol=0, atol=1e-7)
