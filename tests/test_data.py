"""The data contract: batches from any re-iterable, the loss, held-out evaluation, bad data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from allot.data import (
    Data,
    Distill,
    as_data,
    batch_inputs,
    batch_size,
    check_data,
    loader_evaluation,
    supervised,
)
from allot.exceptions import DataError
from allot.profile.measure import mean_loss


def _loader(n: int = 20, batch: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_a_dataloader_works_as_is_and_the_loss_is_sample_weighted() -> None:
    loader = _loader(20, 8)  # batches of 8, 8 and 4
    data = Data(loader, supervised(F.cross_entropy))
    model = _model()
    x, y = loader.dataset.tensors
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))
    assert mean_loss(model, data) == pytest.approx(expected, rel=1e-6)
    assert data.batch_count() == 3 and data.samples() == 20
    assert mean_loss(model, data) == mean_loss(model, data)  # re-iterable: a second pass


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (torch.ones(3, 2), (3, 2)),
        ((torch.ones(4, 2), torch.zeros(4)), (4, 2)),
        ({"input_ids": torch.ones(5, 7), "labels": torch.zeros(5)}, (5, 7)),
    ],
)
def test_default_inputs_of_tensors_tuples_and_dicts(batch, expected) -> None:
    inputs = batch_inputs(batch)
    tensor = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
    assert tuple(tensor.shape) == expected
    assert batch_size(inputs) == expected[0]
    if isinstance(batch, dict):
        assert "labels" not in inputs


def test_custom_inputs_and_loss_for_unusual_batches() -> None:
    """A batch of any shape: the user says where the inputs are and how the loss reads it."""
    batches = [{"image": torch.randn(6, 5), "answer": torch.randint(0, 3, (6,))} for _ in range(2)]
    data = Data(
        batches,
        loss=lambda outputs, batch: F.cross_entropy(outputs, batch["answer"]),
        inputs=lambda batch: batch["image"],
    )
    check_data(_model(), data)
    assert data.samples() == 12


def test_a_one_shot_generator_is_refused_with_what_to_do() -> None:
    with pytest.raises(DataError, match=r"one-shot iterator.*list or a DataLoader"):
        Data((b for b in [(torch.ones(2, 5), torch.zeros(2))]), supervised(F.cross_entropy))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: Data([], supervised(F.cross_entropy)), "holds no batches"),
        (lambda: Data(torch.ones(3), supervised(F.cross_entropy)), "iterable of batches"),
        (lambda: Data([(torch.ones(2, 5), torch.zeros(2))], "nll"), "must be callable"),
    ],
)
def test_malformed_data_is_refused_at_construction(data, message) -> None:
    with pytest.raises(DataError, match=message):
        data()


@pytest.mark.parametrize(
    ("batches", "loss", "message"),
    [
        ([(torch.ones(2, 7), torch.zeros(2).long())], supervised(F.cross_entropy), "cannot run"),
        ([(torch.ones(2, 5), torch.zeros(2).long())], lambda o, b: o.sum(1), "scalar tensor"),
        ([(torch.ones(2, 5), torch.zeros(2).long())], lambda o, b: o.sum() * torch.nan, "finite"),
        ([(torch.ones(0, 5), torch.zeros(0).long())], supervised(F.cross_entropy), "no samples"),
        ([torch.ones(2, 5)], supervised(F.cross_entropy), "needs targets"),
    ],
)
def test_bad_data_gives_one_clear_error(batches, loss, message) -> None:
    with pytest.raises(DataError, match=message) as error:
        check_data(_model(), Data(batches, loss))
    assert "\n" not in str(error.value)


def test_distill_needs_no_labels_and_is_zero_for_the_float_model() -> None:
    model = _model()
    data = Data([(torch.randn(4, 5),) for _ in range(2)], Distill(model))
    assert mean_loss(model, data) == 0.0
    other = _model()
    with torch.no_grad():
        other[0].weight.add_(0.1)
    assert mean_loss(other, data) > 0
    assert Distill(model).identity == data.loss.identity  # the same content, the same cache key


def test_held_out_evaluation_from_a_second_loader() -> None:
    model = _model()
    loader = _loader(30, 7)
    result = loader_evaluation(loader, supervised(F.cross_entropy), accuracy=True)(model)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        logits = model(x)
    assert list(result) == ["accuracy", "loss"]
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


def test_as_data_takes_a_provider_and_refuses_anything_else() -> None:
    data = Data([(torch.ones(1, 5), torch.zeros(1).long())], supervised(F.cross_entropy))

    class Provider:
        def to_data(self) -> Data:
            return data

    assert as_data(Provider()) is data
    with pytest.raises(DataError, match=r"expected allot\.Data"):
        as_data([torch.ones(2)])
