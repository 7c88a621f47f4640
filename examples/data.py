"""A user's own data for allot: noisy 1-D signals and their clean versions, served by DataLoaders.

allot needs calibration batches and a loss `loss(outputs, batch)`; held-out metrics are optional.
Nothing here is specific to allot except wrapping them in `allot.Data`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import allot

LENGTH = 64


def signals(count: int, seed: int) -> TensorDataset:
    """`count` random sums of three sines (clean, (count, 1, LENGTH)) plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, LENGTH)
    frequency = torch.randint(1, 6, (count, 3, 1), generator=generator).float()
    phase = 2 * math.pi * torch.rand(count, 3, 1, generator=generator)
    amplitude = torch.rand(count, 3, 1, generator=generator)
    clean = (amplitude * torch.sin(2 * math.pi * frequency * t + phase)).sum(1, keepdim=True)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=generator)
    return TensorDataset(noisy, clean)


def loss(outputs: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Huber loss of the denoised signals against the clean ones (the batch's mean)."""
    return F.huber_loss(outputs, batch[1], delta=0.5)


def training_loader() -> DataLoader:
    return DataLoader(signals(2048, seed=0), batch_size=64, shuffle=True)


def evaluate(model: nn.Module) -> dict[str, float]:
    """Held-out metrics: mean absolute error (the headline) and the mean loss."""
    held_out = DataLoader(signals(512, seed=2), batch_size=128)
    total_error, total_loss, count = 0.0, 0.0, 0
    with torch.no_grad():
        for noisy, clean in held_out:
            outputs = model(noisy)
            total_error += float((outputs - clean).abs().mean()) * len(noisy)
            total_loss += float(loss(outputs, (noisy, clean))) * len(noisy)
            count += len(noisy)
    return {"mae": total_error / count, "loss": total_loss / count}


def calibration() -> allot.Data:
    """256 calibration signals, the loss, and the held-out evaluation."""
    loader = DataLoader(signals(256, seed=1), batch_size=64)
    return allot.Data(loader, loss, evaluate=evaluate, name="noisy-sines")
