"""The shared training loop of refinements."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allot import Budget, Refinement, compress
from allot.data import Data, supervised
from allot.exceptions import ConfigError, DataError
from allot.methods import get_method
from allot.profile.measure import mean_loss
from allot.refine import get_refiner
from allot.refine.train import TrainSettings, train
from allot.zoo import create_model


def _data(dtype: torch.dtype = torch.float32) -> Data:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator, dtype=dtype)
    y = (x[:, 0] > 0).long()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return Data(batches, supervised(F.cross_entropy), train=batches)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 2))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_lowers_the_loss_and_leaves_eval_mode(optimizer) -> None:
    data, model = _data(), _model()
    before = mean_loss(model, data)
    history = train(
        model, data, TrainSettings(epochs=5, lr=0.05, optimizer=optimizer), progress=False
    )
    assert len(history) == 5 and history[-1] < history[0]
    assert mean_loss(model, data) < before
    assert not model.training


def test_same_seed_same_weights_and_an_extra_term_is_minimised_too() -> None:
    data = _data()
    runs = []
    for _ in range(2):
        model = _model()
        train(model, data, TrainSettings(epochs=2, lr=0.01), progress=False)
        runs.append(model[0].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    model = _model()
    train(
        model,
        data,
        TrainSettings(epochs=3, lr=0.05),
        extra_loss=lambda: 10 * model[0].weight.pow(2).sum(),
        progress=False,
    )
    assert model[0].weight.abs().max() < runs[0].abs().max()


def test_training_needs_training_batches_and_valid_settings() -> None:
    data = Data(_data().calibration, supervised(F.cross_entropy))
    with pytest.raises(DataError, match="no training batches"):
        train(_model(), data, TrainSettings(), progress=False)
    for bad in ({"lr": 0}, {"epochs": -1}, {"optimizer": "lamb"}, {"schedule": "step"}):
        with pytest.raises(ConfigError):
            TrainSettings(**bad)


def test_a_diverging_run_stops_with_a_clear_error() -> None:
    with pytest.raises(DataError, match="lower the learning rate"):
        train(
            _model(),
            _data(),
            TrainSettings(epochs=3, lr=1e30, optimizer="sgd", schedule="constant"),
            extra_loss=lambda: torch.tensor(float("inf")),
            progress=False,
        )


def test_fine_tuning_after_a_low_rank_plan_lowers_the_loss_and_keeps_the_storage(digits) -> None:
    model = create_model("test-mlp")
    plain = compress(model, digits, "uniform-rank", Budget("ratio", 2), progress=False)
    tuned = compress(
        model,
        digits,
        "uniform-rank",
        Budget("ratio", 2),
        refinement=Refinement.of(get_method("uniform-rank"), "finetune", epochs=2, lr=1e-3),
        progress=False,
    )
    assert tuned.plan.weight_bits == plain.plan.weight_bits
    assert tuned.plan.metadata["refine"]["settings"]["epochs"] == 2
    assert mean_loss(tuned.model, digits) < mean_loss(plain.model, digits)


def test_unknown_refinement_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="has no setting 'epoch'"):
        get_refiner("finetune").configure({"epoch": 3})
    with pytest.raises(ConfigError, match=r"no setting 'epochs'.*none"):
        get_refiner("feedback").configure({"epochs": 3})


def _scaled_pair(factor: float) -> tuple[nn.Module, nn.Module]:
    """A two-layer ReLU net and the same function with its first layer multiplied by
    `factor` and the second divided by it (as BatchNorm folding rescales a layer)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(factor)
        other[0].bias.mul_(factor)
        other[2].weight.div_(factor)
    return model, other


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_relative_rates_train_a_rescaled_layer_alike(optimizer) -> None:
    # the step is a fraction of each tensor's RMS: a layer multiplied by c (the next divided by c,
    # the same function) moves by c times the same step, so both train to the same function
    data = _data(torch.float64)
    model, other = _scaled_pair(30.0)
    settings = TrainSettings(
        epochs=3, lr=0.02, optimizer=optimizer, relative=True, schedule="constant"
    )
    for network in (model, other):
        train(network, data, settings, progress=False)
    x = torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():  # to Adam's eps, which is not scale-free
        torch.testing.assert_close(other(x), model(x), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(other[0].weight, 30.0 * model[0].weight, rtol=1e-3, atol=1e-3)
    # without `relative` the same rate trains the two differently
    model, other = _scaled_pair(30.0)
    plain = TrainSettings(epochs=3, lr=0.02, optimizer=optimizer, schedule="constant")
    for network in (model, other):
        train(network, data, plain, progress=False)
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max() > 1e-3


def test_relative_rates_follow_each_tensors_rms() -> None:
    weight = nn.Parameter(torch.full((2, 3), 2.0))
    zeros = nn.Parameter(torch.zeros(6))
    overall = (24.0 / 12) ** 0.5  # sum of squares 24 over 12 entries
    adam = dict(TrainSettings(lr=0.1, relative=True).rates([weight, zeros]))
    sgd = dict(TrainSettings(lr=0.1, optimizer="sgd", relative=True).rates([weight, zeros]))
    assert adam[weight] == pytest.approx(0.2) and adam[zeros] == pytest.approx(0.1 * overall)
    assert sgd[weight] == pytest.approx(0.4) and sgd[zeros] == pytest.approx(0.1 * overall**2)
