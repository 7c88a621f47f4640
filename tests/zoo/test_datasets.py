"""Zoo data sets: documented split sizes, fixed splits, seeded calibration subsets, and the
classification task that scores models on them."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from allot.exceptions import DataError
from allot.zoo import DATASETS, Dataset, Split, get_dataset
from allot.zoo.data import calibration_subset
from allot.zoo.tasks import ClassificationTask

# name -> (train size, test size, shape of one input)
LAYOUT = {
    "digits": (1397, 400, (1, 8, 8)),
    "mnist5k": (4000, 1000, (1, 28, 28)),
    "mnist1d": (4000, 1000, (1, 40)),
}


def load(name: str, calibration_size: int = 64, seed: int = 0) -> Dataset:
    """Call the registered loader directly, bypassing `get_dataset`'s per-process cache."""
    return DATASETS[name](calibration_size=calibration_size, seed=seed)


@pytest.fixture(scope="module", params=sorted(LAYOUT))
def loaded_twice(request: pytest.FixtureRequest) -> tuple[str, Dataset, Dataset]:
    return request.param, load(request.param), load(request.param)


def assert_splits_equal(a: Split, b: Split) -> None:
    assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.targets, b.targets)


def test_layout(loaded_twice: tuple[str, Dataset, Dataset]) -> None:
    name, dataset, _ = loaded_twice
    train_size, test_size, shape = LAYOUT[name]
    assert dataset.name == name
    assert (len(dataset.train), len(dataset.test), len(dataset.calibration)) == (
        train_size,
        test_size,
        64,
    )
    for split in (dataset.train, dataset.test, dataset.calibration):
        assert split.inputs.dtype == torch.float32
        assert split.targets.dtype == torch.int64
        assert tuple(split.inputs.shape[1:]) == shape
        assert torch.isfinite(split.inputs).all()
    for split in (dataset.train, dataset.test):
        assert set(split.targets.tolist()) == set(range(10))
    assert isinstance(dataset.task, ClassificationTask)


def test_loading_is_deterministic(loaded_twice: tuple[str, Dataset, Dataset]) -> None:
    _, first, second = loaded_twice
    for split in ("train", "test", "calibration"):
        assert_splits_equal(first.split(split), second.split(split))


def test_seed_moves_only_the_calibration_subset(loaded_twice: tuple[str, Dataset, Dataset]) -> None:
    name, dataset, _ = loaded_twice
    other = load(name, seed=1)
    assert_splits_equal(dataset.train, other.train)
    assert_splits_equal(dataset.test, other.test)
    assert not torch.equal(dataset.calibration.inputs, other.calibration.inputs)


def test_calibration_is_a_subset_of_train(loaded_twice: tuple[str, Dataset, Dataset]) -> None:
    _, dataset, _ = loaded_twice
    rows = {
        (x.numpy().tobytes(), int(y))
        for x, y in zip(dataset.train.inputs, dataset.train.targets, strict=True)
    }
    calibration = dataset.calibration
    assert all(
        (x.numpy().tobytes(), int(y)) in rows
        for x, y in zip(calibration.inputs, calibration.targets, strict=True)
    )


def test_calibration_subset_is_seeded_sorted_and_capped() -> None:
    train = Split(torch.arange(50.0).unsqueeze(1), torch.arange(50))
    picked = calibration_subset(train, 10, seed=3)
    assert torch.equal(picked.targets, calibration_subset(train, 10, seed=3).targets)
    assert not torch.equal(picked.targets, calibration_subset(train, 10, seed=4).targets)
    assert len(set(picked.targets.tolist())) == 10
    assert torch.equal(picked.targets, picked.targets.sort().values)
    assert torch.equal(picked.inputs.squeeze(1), picked.targets.float())
    assert len(calibration_subset(train, 500, seed=0)) == 50


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_images_are_scaled_to_unit_range(name: str) -> None:
    dataset = get_dataset(name)
    inputs = torch.cat([dataset.train.inputs, dataset.test.inputs])
    assert inputs.min() == 0.0
    assert inputs.max() == 1.0


def test_mnist1d_is_roughly_standardised() -> None:
    inputs = get_dataset("mnist1d").train.inputs
    assert abs(float(inputs.mean())) < 0.1
    assert 0.5 < float(inputs.std()) < 2.0


def test_mnist5k_split_is_shuffled_and_covers_every_example() -> None:
    dataset = get_dataset("mnist5k")
    # The source is sorted by class: an unshuffled split would give single-class batches.
    assert set(dataset.train.targets[:64].tolist()) == set(range(10))
    assert set(dataset.test.targets[:64].tolist()) == set(range(10))
    counts = torch.bincount(torch.cat([dataset.train.targets, dataset.test.targets]))
    assert counts.tolist() == [500] * 10


def test_mnist1d_leaves_global_generators_alone() -> None:
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    load("mnist1d")
    assert (random.random(), np.random.rand()) == expected


def test_unknown_data_set_lists_known_names() -> None:
    with pytest.raises(DataError, match="mnist1d"):
        get_dataset("no-such-data")


class ConstantLogits(nn.Module):
    """Predicts the same logits for every input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_evaluate_scores_accuracy_and_loss() -> None:
    dataset = get_dataset("digits")
    task = dataset.task
    logits = torch.zeros(10)
    logits[3] = 1.0
    model = ConstantLogits(logits).train()
    metrics = task.evaluate(model, dataset, "test")
    assert list(metrics) == ["accuracy", "loss"]
    assert metrics["accuracy"] == pytest.approx(float((dataset.test.targets == 3).float().mean()))
    expected_loss = task.loss(model(dataset.test.inputs), dataset.test.targets).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training, "evaluate must restore the model's mode"
    uniform = task.evaluate(ConstantLogits(torch.zeros(10)), dataset, "calibration")
    assert uniform["loss"] == pytest.approx(math.log(10), rel=1e-6)


def test_evaluate_does_not_depend_on_batch_size() -> None:
    dataset = get_dataset("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    small = Dataset(dataset.name, dataset.task, dataset.train, dataset.test, dataset.calibration, 7)
    full = dataset.task.evaluate(model, dataset)
    batched = dataset.task.evaluate(model, small)
    assert batched["accuracy"] == full["accuracy"]
    assert batched["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_evaluate_rejects_an_empty_split() -> None:
    dataset = get_dataset("digits")
    empty = Split(dataset.test.inputs[:0], dataset.test.targets[:0])
    hollow = Dataset("hollow", dataset.task, dataset.train, empty, dataset.calibration)
    with pytest.raises(DataError, match="empty"):
        dataset.task.evaluate(nn.Flatten(), hollow)
