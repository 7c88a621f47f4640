"""Tasks that score zoo models: the loss training and profiling differentiate, and the metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.data import forward, model_device, to_device
from allot.exceptions import DataError
from allot.zoo.data import Dataset


class ClassificationTask:
    """Single-label classification from logits: cross-entropy loss, accuracy as the headline."""

    headline = "accuracy"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (nats per example) of logits `outputs` (N, classes) against int64
        class labels `targets` (N,)."""
        return F.cross_entropy(outputs, targets)

    def evaluate(self, model: nn.Module, dataset: Dataset, split: str = "test") -> dict[str, float]:
        """`accuracy` (fraction correct, 0..1) and mean cross-entropy `loss` (nats) of `model` on a
        split, in eval mode without gradients, in batches of `dataset.batch_size` moved to the
        model's device.

        The model's train/eval mode is restored afterwards.
        """
        data = dataset.split(split)
        if len(data) == 0:
            raise DataError(f"split {split!r} of data set {dataset.name!r} is empty")
        was_training = model.training
        model.eval()
        correct = 0
        total_loss = 0.0
        device = model_device(model)
        try:
            with torch.no_grad():
                for batch in data.batches(dataset.batch_size):
                    inputs, targets = to_device(batch, device)
                    logits = forward(model, inputs)
                    total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
                    correct += int((logits.argmax(dim=-1) == targets).sum())
        finally:
            model.train(was_training)
        return {"accuracy": correct / len(data), "loss": total_loss / len(data)}
