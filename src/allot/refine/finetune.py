"""Fine-tuning: a short training of a compressed model on the data's training batches.

Every trainable parameter of the applied plan is trained: low-rank and grouped factors, sparse
values, biases, and the float layers the plan kept; quantized codes and scales are stored
buffers and do not move, so what the plan stores, and its size, stay exactly the same. This is
the retraining ALDS follows its allocation with (there with the original schedule's learning
rate, "rewound"); the caller chooses the epochs and the learning rate (`TrainSettings`).
"""

from __future__ import annotations

from torch import nn

from allot.data import Data
from allot.plan import Plan
from allot.refine.train import TrainSettings, train


def finetune(
    reference: nn.Module,
    model: nn.Module,
    plan: Plan,
    data: Data,
    settings: TrainSettings,
    progress: bool = True,
) -> nn.Module:
    """Train `model` (the plan applied) in place for `settings.epochs` epochs; returns it in eval
    mode. `reference` and `plan` are not needed: the model holds the plan's structure. Zero
    epochs train nothing and need no training batches (`--refine-epochs 0` turns a method's
    fine-tuning off)."""
    if settings.epochs == 0:
        return model.eval()
    train(model, data, settings, progress=progress, label="fine-tuning")
    return model
