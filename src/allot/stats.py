"""Per-layer statistics that schemes and error models may use (filled by `allot.profile`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class LayerStats:
    """Statistics of one layer on the calibration data.

    `input_cov` is the sum over calibration samples (and output positions, for convolutions) of
    x x' for the layer's input patch x, shape (fan_in, fan_in), float64; `samples` is how many
    patch vectors were summed. The mean second moment is `input_cov / samples`.
    """

    input_cov: Tensor | None = None
    samples: int = 0
