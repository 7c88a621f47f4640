"""Measured loss changes of weight perturbations against manual computations and autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hessians import pairs
from torch import Tensor, nn

from allot.exceptions import ConfigError, DataError
from allot.profile.measure import loss_change, mean_loss, perturbed


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_batches() -> list[tuple[Tensor, Tensor]]:
    return [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 3)]


def full_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The mean loss over all samples at once: the sample-weighted mean of the batch means."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return F.cross_entropy(model(x), y)


def full_loss_value(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    with torch.no_grad():
        return float(full_loss(model, batches))


def random_deltas(model: nn.Sequential, scale: float) -> dict[str, Tensor]:
    return {name: scale * torch.randn_like(model[int(name)].weight) for name in ("0", "2")}


def test_weights_are_perturbed_inside_and_restored_bit_exactly() -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    deltas = random_deltas(model, 0.3)
    with perturbed(model, deltas):
        for name, delta in deltas.items():
            assert torch.equal(model.get_submodule(name).weight, before[f"{name}.weight"] + delta)
        assert torch.equal(model[0].bias, before["0.bias"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_weights_are_restored_after_an_error_inside() -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="inside"), perturbed(model, random_deltas(model, 0.3)):
        raise RuntimeError("inside")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_loss_change_equals_a_manual_computation() -> None:
    model = mlp()
    batches = make_batches()
    deltas = random_deltas(model, 0.2)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            copied.get_submodule(name).weight += delta
    expected = full_loss_value(copied, batches) - full_loss_value(model, batches)
    assert loss_change(model, deltas, pairs(batches)) == pytest.approx(expected, rel=1e-12)
    reference = mean_loss(model, pairs(batches))
    assert reference == pytest.approx(full_loss_value(model, batches), rel=1e-12)
    measured = loss_change(model, deltas, pairs(batches), reference=reference)
    assert measured == pytest.approx(expected, rel=1e-12)


def test_a_tiny_change_moves_the_loss_by_the_gradient_dot_delta() -> None:
    model = mlp()
    batches = make_batches()
    loss = full_loss(model, batches)
    weights = [model[0].weight, model[2].weight]
    gradients = torch.autograd.grad(loss, weights)
    deltas = random_deltas(model, 1e-6)
    first_order = sum(float((g * d).sum()) for g, d in zip(gradients, deltas.values(), strict=True))
    assert abs(first_order) > 1e-7  # a factor of 2 or a sign error would be far outside 1e-3
    measured = loss_change(model, deltas, pairs(batches))
    assert measured == pytest.approx(first_order, rel=1e-3)


def test_mean_loss_runs_in_eval_mode_and_restores_training_flags() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9)).double()
    model.train()
    batches = make_batches()
    expected = full_loss_value(model.eval(), batches)
    model.train()
    assert mean_loss(model, pairs(batches)) == pytest.approx(expected, rel=1e-12)
    assert all(module.training for module in model.modules())


def test_mean_loss_calls_dict_inputs_as_keyword_arguments() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3).double()

        def forward(self, features: Tensor) -> Tensor:
            return self.linear(features)

    model = Keyword()
    batches = make_batches()
    keyword_batches = [({"features": x}, y) for x, y in batches]
    expected = full_loss_value(model.linear, batches)
    assert mean_loss(model, pairs(keyword_batches)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [("9", (5, 4), "not a module"), ("1", (5, 4), "not a module"), ("2", (5, 3), "shape")],
)
def test_bad_deltas_are_rejected_before_any_weight_changes(
    name: str, shape: tuple[int, ...], message: str
) -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    deltas = {"0": torch.ones(5, 4, dtype=torch.float64), name: torch.ones(shape)}
    with pytest.raises(ConfigError, match=message):
        loss_change(model, deltas, pairs(make_batches()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_tied_weights_and_empty_batches_are_rejected() -> None:
    model = mlp()
    shared = nn.Linear(4, 5).double()
    shared.weight = model[0].weight
    tied = nn.ModuleDict({"a": model[0], "b": shared, "c": model[0]})
    for pair in (("a", "b"), ("a", "c")):
        deltas = {name: torch.zeros(5, 4, dtype=torch.float64) for name in pair}
        with pytest.raises(ConfigError, match="tied"), perturbed(tied, deltas):
            pass
    with pytest.raises(DataError, match="no batches"):
        mean_loss(model, pairs([]))
