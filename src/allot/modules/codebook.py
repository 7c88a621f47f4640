"""Codebook layer: every weight is one of `size` float32 values, stored as a bit-packed index.

Stored tensors: `codes` (uint8, the indices in the flattened weight's row-major order, packed at
`index_bits(size)` = ceil(log2 size) bits each) and `codebook` (float32 parameter of `size`
values, increasing; trainable, so fine-tuning may move the values but not the assignment).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.packing import pack, packed_nbytes, unpack
from allot.modules.sparse import index_bits


class CodebookLayer(CompressedLayer):
    """A layer whose weight takes its values from a codebook of `size` entries."""

    def __init__(self, spec: LayerSpec, size: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, bias)
        if size < 2:
            raise ConfigError(f"a codebook holds at least 2 values, got {size}")
        self.size = size
        self.bits = index_bits(size)
        self.register_buffer(
            "codes", torch.zeros(packed_nbytes(spec.numel, self.bits), dtype=torch.uint8)
        )
        self.codebook = nn.Parameter(torch.zeros(size))

    @classmethod
    def from_codes(
        cls, spec: LayerSpec, codes: Tensor, codebook: Tensor, bias: Tensor | None = None
    ) -> CodebookLayer:
        """Build from integer `codes` (any shape with `spec.numel` entries, row-major over the
        weight) in [0, size) and the `codebook` values (1-D, stored as float32)."""
        if codebook.dim() != 1 or codes.numel() != spec.numel:
            raise ConfigError(
                f"need a 1-D codebook and {spec.numel} codes, got {tuple(codebook.shape)} and "
                f"{codes.numel()} codes"
            )
        layer = cls(spec, codebook.numel(), bias)
        layer.codes = pack(codes.reshape(-1), layer.bits)
        layer.codebook = nn.Parameter(stored_copy(codebook))
        return layer

    def unpacked_codes(self) -> Tensor:
        """The codebook index of every weight, int64, flat (row-major)."""
        codes = unpack(self.codes, self.bits, self.spec.numel)
        if codes.numel() and int(codes.max()) >= self.size:
            raise ConfigError(f"a stored code exceeds the codebook's {self.size} entries")
        return codes

    def check_state(self) -> None:
        """Finite floats, and every code names a codebook entry."""
        super().check_state()
        self.unpacked_codes()

    def weight_parameter_count(self) -> int:
        return self.spec.numel + self.size

    def reconstruct(self) -> Tensor:
        return self.codebook[self.unpacked_codes()].view(self.spec.weight_shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, size={self.size}"
