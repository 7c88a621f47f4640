"""Data sets of the benchmark zoo: fixed splits held in memory, plus the task that scores a model.

A `Split` holds inputs (a tensor, or a dict of tensors for models called with keyword arguments, such
as a transformer's `input_ids`/`attention_mask`) and targets (class labels, or reference outputs).
A `Dataset` has a train, a test and a calibration split; the calibration split is a fixed, seeded
subset of the training split. Data sets register by name, like models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from allot.exceptions import DataError

Inputs = Tensor | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]


def forward(model: nn.Module, inputs: Inputs) -> Tensor:
    """Call a model on a batch of inputs (keyword arguments when the inputs are a dict)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def token_mask(inputs: Inputs) -> Tensor | None:
    """Boolean (N, T) mask of the real tokens of a batch of sequences, from its `attention_mask`
    (1 = token, 0 = padding); None for inputs that carry no attention mask. Padding positions are
    masked out of every attention and pooling, so nothing computed there reaches the output."""
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return inputs["attention_mask"].bool()
    return None


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


DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: register a loader `fn(calibration_size, seed) -> Dataset` under `name`."""

    def wrap(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in DATASETS:
            raise ValueError(f"data set {name!r} registered twice")
        DATASETS[name] = fn
        return fn

    return wrap


@cache
def get_dataset(name: str, calibration_size: int = 512, seed: int = 0) -> Dataset:
    """Load a registered data set (cached per process). `DataError` for unknown names."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    if calibration_size < 1:
        raise DataError(f"calibration size must be at least 1, got {calibration_size}")
    return DATASETS[name](calibration_size=calibration_size, seed=seed)


def calibration_subset(train: Split, size: int, seed: int) -> Split:
    """A fixed, seeded subset of the training split (size capped at the split's length)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train), generator=generator)[: min(size, len(train))]
    return train.subset(index.sort().values)


def describe(value: Any) -> str:
    """Shape summary of inputs, for error messages."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in value.items()) + "}"
    return str(tuple(value.shape))
