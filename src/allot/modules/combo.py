"""Additive layer: the weight is the sum of several compressed parts (quantized + sparse, say).

Each part is a compressed layer of the same geometry without a bias (its state dict entries sit
under `parts.<i>.`); the sum layer holds the bias. The forward pass runs one operation with the
summed dense weight, so the layer costs one dense operation whatever its parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer


class SumLayer(CompressedLayer):
    """A layer whose weight is the sum of its `parts`' weights (each a `CompressedLayer`)."""

    def __init__(
        self, spec: LayerSpec, parts: Sequence[CompressedLayer], bias: Tensor | None = None
    ) -> None:
        super().__init__(spec, bias)
        inner = spec.with_channels(bias=False)
        for part in parts:
            if not isinstance(part, CompressedLayer) or part.spec != inner or part.bias is not None:
                raise ConfigError(
                    "every part of a sum must be a compressed layer of the same geometry without "
                    "a bias"
                )
        if len(parts) < 2:
            raise ConfigError(f"a sum needs at least two parts, got {len(parts)}")
        self.parts = nn.ModuleList(parts)

    def check_state(self) -> None:
        """Every part's own checks (and the bias's finiteness)."""
        super().check_state()
        for i, part in enumerate(self.parts):
            try:
                part.check_state()
            except ConfigError as exc:
                raise ConfigError(f"parts.{i}.{exc}") from exc

    def weight_parameter_count(self) -> int:
        return sum(part.weight_parameter_count() for part in self.parts)

    def reconstruct(self) -> Tensor:
        return torch.stack([part.reconstruct() for part in self.parts]).sum(0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={len(self.parts)}"
