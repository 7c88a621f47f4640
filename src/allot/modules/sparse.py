"""Sparse layer: a few float32 weights and their bit-packed flat positions; no dense mask.

Stored tensors: `values` (float32 parameter, trainable, one per kept weight) and `indices` (uint8,
the kept positions in the flattened weight, strictly increasing, packed at `index_bits(numel)` bits
each).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.packing import pack, packed_nbytes, unpack


def index_bits(numel: int) -> int:
    """Bits per stored position: ceil(log2(numel)), at least 1."""
    return max(1, (numel - 1).bit_length())


class SparseLayer(CompressedLayer):
    """A layer whose weight is zero except at `count` stored positions."""

    def __init__(self, spec: LayerSpec, count: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, bias)
        if not 0 <= count <= spec.numel:
            raise ConfigError(f"a sparse layer keeps 0..{spec.numel} weights, got {count}")
        self.count = count
        self.index_bits = index_bits(spec.numel)
        self.values = nn.Parameter(torch.zeros(count))
        self.register_buffer(
            "indices", torch.zeros(packed_nbytes(count, self.index_bits), dtype=torch.uint8)
        )

    @classmethod
    def from_values(
        cls, spec: LayerSpec, indices: Tensor, values: Tensor, bias: Tensor | None = None
    ) -> SparseLayer:
        """Build from strictly increasing flat positions `indices` in [0, numel) (into the weight
        flattened row-major) and their `values`; values are stored as float32."""
        if indices.dim() != 1 or values.shape != indices.shape:
            raise ConfigError(
                f"indices and values must be 1-D of equal length, got {tuple(indices.shape)} and "
                f"{tuple(values.shape)}"
            )
        if indices.numel() and (
            int(indices[0]) < 0
            or int(indices[-1]) >= spec.numel
            or bool((indices[1:] <= indices[:-1]).any())
        ):
            raise ConfigError(f"indices must be strictly increasing within [0, {spec.numel})")
        layer = cls(spec, indices.numel(), bias)
        layer.values = nn.Parameter(stored_copy(values))
        layer.indices = pack(indices, layer.index_bits)
        return layer

    def positions(self) -> Tensor:
        """The kept flat positions, int64, increasing."""
        return unpack(self.indices, self.index_bits, self.count)

    def check_state(self) -> None:
        """Besides finite values: positions strictly increasing and within the weight."""
        super().check_state()
        positions = self.positions()
        if positions.numel() and (
            int(positions[-1]) >= self.spec.numel or bool((positions[1:] <= positions[:-1]).any())
        ):
            raise ConfigError(
                f"indices must be strictly increasing positions within [0, {self.spec.numel})"
            )

    def weight_parameter_count(self) -> int:
        return self.count

    def reconstruct(self) -> Tensor:
        dense = self.values.new_zeros(self.spec.numel).scatter(0, self.positions(), self.values)
        return dense.view(self.spec.weight_shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, count={self.count}"
