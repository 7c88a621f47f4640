"""Sparse: keep the largest-magnitude weights in float32, with bit-packed positions.

Storage of a layer with n weights keeping k = max(1, floor(density * n + 0.5)) of them, in bits:
32 * k for the values + 8 * ceil(k * b / 8) for the positions, b = max(1, ceil(log2 n)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import check_layer_tensors
from allot.modules.packing import packed_nbytes
from allot.modules.sparse import SparseLayer, index_bits
from allot.schemes.base import Scheme, register_scheme

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile


def top_magnitude_positions(weight: Tensor, count: int) -> Tensor:
    """Flat positions of the `count` largest |w|, increasing; ties go to the lower position."""
    order = torch.sort(weight.detach().reshape(-1).abs(), descending=True, stable=True).indices
    return order[:count].sort().values


@register_scheme
@dataclasses.dataclass(frozen=True)
class Sparse(Scheme):
    """Keep a fraction `density` in (0, 1] of the weights (largest magnitude); `sparse:0.05`."""

    kind: ClassVar[str] = "sparse"
    density: float

    def __post_init__(self) -> None:
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ConfigError(f"Sparse.density must be a number in (0, 1], got {d!r:.40}")
        object.__setattr__(self, "density", float(d))

    def kept(self, spec: LayerSpec) -> int:
        """Number of weights kept: max(1, floor(density * numel + 0.5))."""
        return max(1, math.floor(self.density * spec.numel + 0.5))

    def storage_bits(self, spec: LayerSpec) -> int:
        k = self.kept(spec)
        return 32 * k + 8 * packed_nbytes(k, index_bits(spec.numel))

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> SparseLayer:
        check_layer_tensors(spec, weight, bias)
        positions = top_magnitude_positions(weight, self.kept(spec))
        values = weight.detach().reshape(-1)[positions]
        return SparseLayer.from_values(spec, positions, values, bias)

    def empty(self, spec: LayerSpec) -> SparseLayer:
        return SparseLayer(spec, self.kept(spec))

    @classmethod
    def parse_args(cls, args: list[str]) -> Sparse:
        if len(args) != 1:
            raise ValueError("expected sparse:DENSITY, e.g. sparse:0.05")
        return cls(float(args[0]))
