"""Every error model on a tiny float64 model: one damage per perturbation, zero for no change,
and each equal to its formula on exact quantities."""

import pytest
import torch
from hessians import pairs
from torch import nn

from allot.discover import discover, fold_weight_2d
from allot.errors import ERROR_MODELS, get_error_model
from allot.exceptions import ConfigError
from allot.profile.engine import Profile, Settings
from allot.profile.measure import loss_change


@pytest.fixture
def profile() -> Profile:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    batches = [
        (torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (n,))) for n in (5, 3)
    ]
    settings = Settings(probes_min=64, probes_max=64)
    return Profile(model, discover(model).layers, pairs(batches), settings=settings, progress=False)


def deltas(profile: Profile, scale: float = 1e-2) -> dict[str, list[torch.Tensor]]:
    return {
        name: [
            scale * torch.randn(profile.curvature.shape(name), dtype=torch.float64) for _ in "ab"
        ]
        + [torch.zeros(profile.curvature.shape(name), dtype=torch.float64)]
        for name in profile.names
    }


@pytest.mark.parametrize("name", sorted(ERROR_MODELS))
def test_every_model_gives_one_finite_damage_per_perturbation(profile, name) -> None:
    changes = deltas(profile)
    damages = ERROR_MODELS[name].damages(changes, profile)
    assert list(damages) == profile.names
    for layer in profile.names:
        assert len(damages[layer]) == 3
        assert all(isinstance(d, float) and d == d for d in damages[layer])
        assert damages[layer][-1] == 0.0  # no change, no damage
        assert damages[layer][0] != damages[layer][1]


def test_each_model_is_its_formula(profile) -> None:
    changes = deltas(profile)
    for layer in profile.names:
        d = changes[layer][0]
        g = profile.gradient(layer).double()
        estimate = profile.hessian_estimates()[layer]
        stats = profile.inputs(layer)
        d2 = fold_weight_2d(d)
        weight = profile.model.get_submodule(layer).weight.detach()
        expected = {
            "weight": float(d.pow(2).sum()),
            "weight-relative": float(d.pow(2).sum())
            / float(profile.model.get_submodule(layer).weight.pow(2).sum()),
            "operator-relative": float(torch.linalg.matrix_norm(d2, ord=2))
            / float(torch.linalg.matrix_norm(fold_weight_2d(weight).double(), ord=2)),
            "output": float(((d2 @ stats.input_cov) * d2).sum() / stats.samples),
            "trace": float(g.mul(d).sum())
            + 0.5 * estimate.trace / d.numel() * float(d.pow(2).sum()),
            "diagonal": float(g.mul(d).sum()) + 0.5 * float((estimate.diagonal * d.pow(2)).sum()),
            "second-order": profile.second_order({layer: [d]})[layer][0].total,
            "measured": loss_change(profile.model, {layer: d}, profile.data),
        }
        for name, value in expected.items():
            got = ERROR_MODELS[name].damages({layer: [d]}, profile)[layer][0]
            assert got == pytest.approx(value, rel=1e-12), name


def test_curvature_models_rank_large_changes_above_small_ones(profile) -> None:
    layer = profile.names[0]
    direction = torch.randn(profile.curvature.shape(layer), dtype=torch.float64)
    for name in ("second-order", "trace", "diagonal", "weight", "output"):
        small, large = ERROR_MODELS[name].damages(
            {layer: [1e-3 * direction, 1e-1 * direction]}, profile
        )[layer]
        assert abs(large) > abs(small), name


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="second-order"):
        get_error_model("hessian")


def test_the_measured_model_agrees_with_second_order_for_small_changes_only(profile) -> None:
    """For a small change the measured loss change is the second-order one to third order; for a
    large one the two part (the reason to measure large low-rank cuts)."""
    layer = profile.names[1]
    direction = torch.randn(profile.curvature.shape(layer), dtype=torch.float64)
    changes = {layer: [1e-4 * direction, 3.0 * direction]}
    measured = ERROR_MODELS["measured"].damages(changes, profile)[layer]
    predicted = [t.total for t in profile.second_order(changes)[layer]]
    assert measured[0] == pytest.approx(predicted[0], rel=1e-3)
    assert abs(measured[1] - predicted[1]) > 0.1 * abs(measured[1])
    assert ERROR_MODELS["measured"].damages(changes, profile)[layer] == measured  # kept
