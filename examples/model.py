"""A user's own model for allot: a small 1-D convolutional denoiser, and how it was trained.

python examples/model.py weights.safetensors    # trains it (a few seconds) and saves it
"""

from __future__ import annotations

import sys

import torch
from data import loss, training_loader
from safetensors.torch import save_file
from torch import nn


def make() -> nn.Module:
    """The architecture (allot replaces its layers; any initial weights)."""
    return nn.Sequential(
        nn.Conv1d(1, 24, 7, padding=3),
        nn.ReLU(),
        nn.Conv1d(24, 24, 7, padding=3),
        nn.ReLU(),
        nn.Conv1d(24, 1, 7, padding=3),
    )


def train(path: str, epochs: int = 8) -> nn.Module:
    """Train `make()` on the training signals with Adam and save its weights to `path`."""
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in training_loader():
            optimizer.zero_grad()
            loss(model(batch[0]), batch).backward()
            optimizer.step()
    save_file(model.state_dict(), path)
    return model.eval()


if __name__ == "__main__":
    train(sys.argv[1] if len(sys.argv) > 1 else "weights.safetensors")
