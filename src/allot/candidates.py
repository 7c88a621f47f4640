"""Candidates: for every layer, every scheme on its grid, with its cost and predicted damage.

Each candidate is really fitted (the scheme compresses the layer's weight), so its damage is computed
from the actual perturbation dW = W_hat - W, and its cost is the scheme's exact storage in bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from allot.allocate import Options
from allot.discover import Layer, LayerSpec, fold_weight_2d, get_weight
from allot.errors import ErrorModel
from allot.modules.base import dense_weight
from allot.progress import progress_bar
from allot.schemes import Scheme
from allot.stats import LayerStats

Grid = Callable[[LayerSpec], list[Scheme]]


@dataclass(frozen=True)
class Candidate:
    """One (layer, scheme) option: storage in bits and predicted damage (error-model units)."""

    scheme: Scheme
    cost_bits: int
    damage: float


@dataclass
class CandidateTable:
    """All candidates of all layers, in layer order, scored by one error model."""

    layers: list[Layer]
    candidates: list[list[Candidate]]
    error_model: str

    def options(self) -> Options:
        """Cost/damage arrays for the allocators."""
        return Options(
            [np.array([c.cost_bits for c in row], dtype=np.float64) for row in self.candidates],
            [np.array([c.damage for c in row], dtype=np.float64) for row in self.candidates],
        )

    def chosen(self, choice: list[int]) -> list[Candidate]:
        return [row[j] for row, j in zip(self.candidates, choice, strict=True)]


@torch.no_grad()
def score_candidates(
    model: nn.Module,
    layers: list[Layer],
    grid: Grid,
    error_model: ErrorModel,
    stats: dict[str, LayerStats] | None = None,
    progress: bool = True,
) -> CandidateTable:
    """Fit every grid scheme to every layer and predict its damage with `error_model`."""
    rows: list[list[Candidate]] = []
    for layer in progress_bar(layers, "scoring candidates", progress):
        weight, bias = get_weight(model, layer.name)
        layer_stats = stats.get(layer.name) if stats else None
        row = []
        for scheme in grid(layer.spec):
            module = scheme.compress(weight, bias, layer.spec, layer_stats)
            delta = fold_weight_2d(dense_weight(module) - weight)
            damage = error_model.damage(delta, layer_stats)
            row.append(Candidate(scheme, scheme.storage_bits(layer.spec), damage))
        rows.append(row)
    return CandidateTable(layers, rows, error_model.name)
