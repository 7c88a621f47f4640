"""Scoring holds one layer's dense perturbations at a time for layerwise error models and at most
about `HELD_BYTES` for the others, and a layerwise model's damages do not depend on which layers
it is handed together."""

import gc
import weakref

import pytest
import torch
from hessians import pairs
from torch import nn

import allot.candidates as candidates
from allot.candidates import score_candidates
from allot.discover import discover
from allot.errors import ERROR_MODELS, ErrorModel, get_error_model
from allot.profile.engine import Profile, Settings
from allot.schemes import Keep, Quant


def _profile() -> Profile:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)
    ).double()
    batches = [
        (torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (n,))) for n in (5, 3)
    ]
    settings = Settings(probes_min=16, probes_max=16)
    return Profile(model, discover(model).layers, pairs(batches), settings=settings, progress=False)


def _grid(_layer):
    return [Quant(2), Quant(4), Keep()]


class Recorder:
    """An error model's `damages` (those of `model`) that records the layers of each call and
    weak references to every perturbation it was handed."""

    def __init__(self, model: str = "output") -> None:
        self.model = get_error_model(model)
        self.calls: list[list[str]] = []
        self.handed: list[weakref.ref] = []
        self.alive_at_call: list[int] = []

    def __call__(self, deltas, profile):
        gc.collect()
        self.alive_at_call.append(sum(ref() is not None for ref in self.handed))
        self.calls.append(list(deltas))
        self.handed += [weakref.ref(d) for ds in deltas.values() for d in ds]
        return self.model.damages(deltas, profile)


@pytest.mark.parametrize("layerwise", [True, False])
def test_layerwise_scoring_frees_each_layers_perturbations_once_scored(layerwise) -> None:
    profile = _profile()
    recorder = Recorder()
    model = ErrorModel("recorded", recorder, layerwise=layerwise)
    table = score_candidates(profile.model, profile.layers, _grid, model, profile, False)
    if layerwise:
        assert recorder.calls == [[name] for name in profile.names]
        assert recorder.alive_at_call == [0] * len(profile.names)
    else:
        assert recorder.calls == [profile.names]
    expected = score_candidates(
        profile.model, profile.layers, _grid, get_error_model("output"), profile, False
    )
    assert [[c.damage for c in row] for row in table.candidates] == [
        [c.damage for c in row] for row in expected.candidates
    ]


def test_curvature_scoring_past_the_held_bytes_scores_in_several_calls_alike(monkeypatch) -> None:
    profile = _profile()
    curvature = get_error_model("curvature")
    together = score_candidates(profile.model, profile.layers, _grid, curvature, profile, False)
    sweeps = profile.curvature.passes.gradient_sweeps
    profile = _profile()  # the same model and data, nothing computed yet
    recorder = Recorder("curvature")
    recorded = ErrorModel("recorded", recorder)
    # float64 perturbations of 3 candidates per layer: the first two layers reach the limit
    first, second, third = profile.layers
    monkeypatch.setattr(candidates, "HELD_BYTES", 3 * 8 * (second.spec.numel + third.spec.numel))
    apart = score_candidates(profile.model, profile.layers, _grid, recorded, profile, False)
    assert recorder.calls == [[first.name, second.name], [third.name]]
    assert recorder.alive_at_call == [0, 0]
    assert profile.curvature.passes.gradient_sweeps == sweeps + 1
    for row, expected in zip(apart.candidates, together.candidates, strict=True):
        assert [c.damage for c in row] == pytest.approx([c.damage for c in expected], rel=1e-9)


@pytest.mark.parametrize("name", sorted(n for n, m in ERROR_MODELS.items() if m.layerwise))
def test_a_layerwise_model_scores_a_layer_alone_as_with_the_others(name) -> None:
    profile = _profile()
    generator = torch.Generator().manual_seed(1)
    deltas = {
        layer: [
            1e-2 * torch.randn(profile.curvature.shape(layer), generator=generator).double()
            for _ in range(2)
        ]
        for layer in profile.names
    }
    model = ERROR_MODELS[name]
    together = model.damages(deltas, profile)
    for layer in reversed(profile.names):
        alone = model.damages({layer: deltas[layer]}, profile)
        assert alone == {layer: pytest.approx(together[layer], rel=1e-12)}
