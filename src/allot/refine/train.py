"""Training on the data contract's training batches: the loop every refinement that trains shares
(a short fine-tune of a compressed model, LC's L steps).

`train` runs `settings.epochs` passes over `data.train` with the data's loss plus an optional
extra term (LC's penalty), in train mode, with an Adam or SGD optimiser over the model's trainable
parameters, the learning rate constant or decayed by a cosine from `lr` to 0 over all steps. With
`relative`, the rate is per parameter tensor and scale-free: `lr` is then the step as a fraction of
the tensor's RMS (Adam's rate lr s, SGD's lr s^2 for a tensor of RMS s at the start), so a tensor
multiplied by a constant trains alike, as BatchNorm folding multiplies each layer's weights. The
model is left in eval mode. Training uses `torch.manual_seed(settings.seed)` for anything random
in the model (dropout); the batch order is the training collection's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from allot.data import Data
from allot.exceptions import ConfigError, DataError
from allot.progress import progress_bar

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainSettings:
    """How to train: `epochs` passes over the training batches, optimiser `adam` or `sgd` (with
    `momentum`), learning rate `lr` under `schedule` (`constant`, or `cosine` decay to 0),
    L2 `weight_decay`, and the `seed` of anything random in the model. `relative`: `lr` is a
    fraction of each parameter tensor's RMS (see the module's docstring)."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    relative: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs must be a whole number >= 0, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the learning rate must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.weight_decay >= 0 and 0 <= self.momentum < 1):
            raise ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")

    def make_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        groups = [{"params": [p], "lr": rate} for p, rate in self.rates(parameters)]
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def rates(self, parameters: list[nn.Parameter]) -> list[tuple[nn.Parameter, float]]:
        """Each parameter's learning rate: `lr`, or with `relative` lr s (Adam) or lr s^2 (SGD)
        for a tensor of RMS s; a tensor of zeros takes the RMS of all the parameters together."""
        if not self.relative:
            return [(p, self.lr) for p in parameters]
        with torch.no_grad():
            squares = [float(p.double().pow(2).mean()) for p in parameters]
            total = sum(float(p.double().pow(2).sum()) for p in parameters)
            overall = math.sqrt(total / sum(p.numel() for p in parameters))
        power = 1 if self.optimizer == "adam" else 2
        return [
            (p, self.lr * (math.sqrt(sq) if sq > 0 else overall) ** power)
            for p, sq in zip(parameters, squares, strict=True)
        ]


def train(
    model: nn.Module,
    data: Data,
    settings: TrainSettings,
    *,
    extra_loss: Callable[[], Tensor] | None = None,
    progress: bool = True,
    label: str = "training",
) -> list[float]:
    """Train `model`'s trainable parameters in place on `data.train`; returns the mean training
    loss (data loss plus `extra_loss()`, sample-weighted) of each epoch. `DataError` when the
    data has no training batches."""
    if data.train is None:
        raise DataError(
            "refinement trains the model but the data has no training batches: give "
            "Data(train=...) (the zoo's data sets have them)"
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("the model has no trainable parameters to refine")
    torch.manual_seed(settings.seed)
    optimizer = settings.make_optimizer(parameters)
    steps = settings.epochs * _batches(data)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
        if settings.schedule == "cosine" and steps > 0
        else None
    )
    history = []
    for _ in progress_bar(range(settings.epochs), label, progress):
        model.train()
        total, count = 0.0, 0
        for batch in data.train:
            optimizer.zero_grad(set_to_none=True)
            loss = data.loss(data.outputs(model, batch), batch)
            if extra_loss is not None:
                loss = loss + extra_loss()
            if not torch.isfinite(loss.detach()):
                model.eval()
                raise DataError(
                    f"{label}: the loss became {float(loss.detach())}; lower the learning rate"
                )
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n = data.size(batch)
            total += float(loss.detach()) * n
            count += n
        history.append(total / max(count, 1))
    model.eval()
    return history


def _batches(data: Data) -> int:
    """Training batches per epoch (one pass to count them when the collection has no length)."""
    train = data.train
    assert train is not None
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in train)
