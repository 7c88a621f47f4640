"""The additive scheme: its alternating fit, storage, nesting limits and string form."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import SPECS, make_case

from allot.discover import LayerSpec
from allot.exceptions import ConfigError, PlanError
from allot.modules.base import dense_weight
from allot.schemes import (
    Codebook,
    Keep,
    LowRank,
    Quant,
    Sparse,
    Sum,
    parse_scheme,
    scheme_from_json,
)
from allot.stats import LayerStats


def _residual(scheme, case) -> float:
    module = scheme.compress(case.weight, case.bias, case.spec)
    return float((dense_weight(module).detach() - case.weight).double().pow(2).sum())


@pytest.mark.parametrize("parts", [(Quant(2), Sparse(0.05)), (LowRank(1), Sparse(0.1))])
def test_more_rounds_never_increase_the_residual(parts) -> None:
    case = make_case(SPECS["linear-nobias"], seed=2)
    residuals = [_residual(Sum(parts, repeats=r), case) for r in range(1, 7)]
    assert all(b <= a for a, b in itertools.pairwise(residuals))


def test_later_rounds_improve_on_the_first_where_the_parts_interact() -> None:
    case = make_case(SPECS["linear-nobias"], seed=2)
    parts = (LowRank(1), Sparse(0.1))
    assert _residual(Sum(parts, repeats=6), case) < 0.99 * _residual(Sum(parts, repeats=1), case)


def test_a_sum_beats_each_of_its_parts_alone() -> None:
    case = make_case(SPECS["conv2d-dilated"], seed=1)
    whole = _residual(Sum((Quant(2), Sparse(0.05))), case)
    assert whole < _residual(Quant(2), case)
    assert whole < _residual(Sparse(0.05), case)


def test_storage_is_the_sum_of_the_parts_without_bias() -> None:
    spec = SPECS["linear"]
    inner = spec.with_channels(bias=False)
    scheme = Sum((Quant(3, 4), LowRank(2), Sparse(0.1)))
    assert scheme.storage_bits(spec) == sum(p.storage_bits(inner) for p in scheme.parts)


def test_parts_must_be_compressing_schemes() -> None:
    with pytest.raises(ConfigError, match="at least two"):
        Sum((Quant(2),))
    with pytest.raises(ConfigError, match="not keep"):
        Sum((Quant(2), Keep()))
    with pytest.raises(ConfigError, match="not another sum"):
        Sum((Quant(2), Sum((Quant(2), Sparse(0.1)))))
    with pytest.raises(ConfigError, match="exceeds the layer's full rank"):
        Sum((Quant(2), LowRank(99))).check(SPECS["linear"])


def test_json_nests_and_deep_or_broken_nesting_is_refused() -> None:
    scheme = parse_scheme("quant:1+sparse:0.02")
    assert scheme == Sum((Quant(1), Sparse(0.02)))
    data = scheme.to_json()
    assert data["parts"][0] == {
        "kind": "quant",
        "bits": 1,
        "group": None,
        "rounding": "nearest",
        "grid": "symmetric",
    }
    assert scheme.label() == "quant1+sparse0.02"
    broken = {**data, "parts": [data["parts"][0], {"kind": "sparse", "density": 7}]}
    with pytest.raises(PlanError, match=r"parts\[1\]"):
        scheme_from_json(broken)
    deep: dict = {"kind": "quant", "bits": 2}
    for _ in range(20):
        deep = {"kind": "sum", "parts": [deep, deep]}
    with pytest.raises(PlanError, match="nest deeper"):
        scheme_from_json(deep)


def test_the_fit_is_deterministic_and_reloads() -> None:
    case = make_case(SPECS["conv1d-strided"], seed=4)
    scheme = Sum((Quant(2, 4, "steered"), Sparse(0.05)))
    first = scheme.compress(case.weight, case.bias, case.spec, case.profile)
    again = scheme.compress(case.weight, case.bias, case.spec, case.profile)
    assert torch.equal(dense_weight(first), dense_weight(again))
    fresh = scheme.empty(case.spec)
    fresh.load_state_dict(first.state_dict())
    assert torch.equal(fresh(case.x), first(case.x))


@pytest.mark.parametrize(
    "parts", [(Quant(1), Sparse(0.05)), (LowRank(1), Sparse(0.1)), (Codebook(2), LowRank(1))]
)
def test_the_c_step_from_the_previous_theta_never_leaves_a_larger_residual(parts) -> None:
    case = make_case(SPECS["linear-nobias"], seed=3)
    scheme = Sum(parts, repeats=3)
    previous = scheme.project(case.weight, None, case.spec)
    target = case.weight + 0.05 * torch.randn(case.weight.shape)

    def residual(module) -> float:
        return float((dense_weight(module).detach() - target).double().pow(2).sum())

    warm = scheme.project(target, None, case.spec, previous)
    assert residual(warm) <= residual(previous)
    single = Sum(parts, repeats=1).project(target, None, case.spec, previous)
    assert residual(single) <= residual(previous)
    assert residual(warm) <= residual(single)


def test_a_previous_fit_of_other_parts_is_not_a_start() -> None:
    case = make_case(SPECS["linear-nobias"], seed=3)
    other = Sum((LowRank(2), Sparse(0.1))).project(case.weight, None, case.spec)
    mine = Sum((LowRank(1), Sparse(0.1)))
    fitted = mine.project(case.weight, None, case.spec, other)
    assert fitted.parts[0].rank == 1
    assert torch.equal(
        fitted.state_dict()["parts.0.u"],
        mine.project(case.weight, None, case.spec).state_dict()["parts.0.u"],
    )


def test_a_sum_of_small_parts_runs_them_instead_of_the_dense_weight() -> None:
    spec = LayerSpec("conv2d", 32, 16, (3, 3), padding=(1, 1))
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(spec.weight_shape, generator=g), torch.randn(32, generator=g)
    x = torch.randn(2, 16, 6, 6, generator=g)
    cheap = Sum((LowRank(1), LowRank(2))).compress(weight, bias, spec)
    dense = Sum((Quant(2), LowRank(2))).compress(weight, bias, spec)
    assert cheap.runs_parts and not dense.runs_parts
    with torch.no_grad():
        for layer in (cheap, dense):
            expected = spec.forward(x, dense_weight(layer), bias)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    out = cheap(x)
    assert cheap.macs(out) == 36 * 3 * (16 * 9 + 32) * 2 < spec.numel * 36 * 2
    assert dense.macs(out) == spec.numel * 36 * 2


def _weighted(difference: torch.Tensor, second: torch.Tensor) -> float:
    d = difference.reshape(difference.shape[0], -1).double()
    return float(((d @ second) * d).sum())


@pytest.mark.parametrize(
    "parts",
    [
        (Quant(2, rounding="steered"), Sparse(0.05)),
        (Quant(1, rounding="steered"), LowRank(1, "whitened")),
        (LowRank(1, "whitened"), Sparse(0.05)),
    ],
)
def test_a_sum_refits_under_new_moments_when_a_part_does(parts) -> None:
    case = make_case(SPECS["conv1d-strided"], seed=5)
    assert Sum(parts).refits and not Sum((Quant(2), Sparse(0.05))).refits
    # A target and input moments unlike the weight's profile (a few input directions 30 times
    # stronger): the refit judges its residual under them, so more rounds never raise it there.
    inputs = case.profile.inputs()
    scale = torch.ones(case.spec.fan_in, dtype=torch.float64)
    scale[::3] = 30.0
    stats = LayerStats(scale[:, None] * inputs.input_cov * scale[None, :], inputs.samples)
    target = case.weight + 0.3 * torch.randn(
        case.weight.shape, generator=torch.Generator().manual_seed(6)
    )
    errors = []
    for repeats in (1, 2, 3, 4):
        module = Sum(parts, repeats).refit(target, case.bias, case.spec, stats)
        assert module.state_dict().keys() == Sum(parts).empty(case.spec).state_dict().keys()
        errors.append(_weighted(dense_weight(module).detach() - target, stats.input_cov))
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors)), errors


def test_a_sum_of_parts_that_do_not_refit_refuses_to() -> None:
    case = make_case(SPECS["conv1d-strided"], seed=5)
    with pytest.raises(ConfigError, match="cannot be re-fitted"):
        Sum((Quant(2), Sparse(0.05))).refit(
            case.weight, case.bias, case.spec, case.profile.inputs()
        )
