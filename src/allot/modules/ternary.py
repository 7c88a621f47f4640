"""Ternary layer: every weight of output channel o is -a_o, 0 or +a_o.

Stored tensors: `codes` (uint8, one code in {0, 1, 2} per weight for -1, 0, +1, row-major over the
weight folded to (out, fan_in), packed at 2 bits) and `scale` (float16, a_o per output channel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.packing import pack, packed_nbytes, unpack

BITS = 2


class TernaryLayer(CompressedLayer):
    """A layer whose weight is a per-channel scale times a code in {-1, 0, +1}."""

    def __init__(self, spec: LayerSpec, bias: Tensor | None = None) -> None:
        super().__init__(spec, bias)
        self.register_buffer(
            "codes", torch.zeros(packed_nbytes(spec.numel, BITS), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.zeros(spec.out_features, dtype=torch.float16))

    @classmethod
    def from_codes(
        cls, spec: LayerSpec, signs: Tensor, scale: Tensor, bias: Tensor | None = None
    ) -> TernaryLayer:
        """Build from `signs` (integers in {-1, 0, 1}, shape (out, fan_in)) and the float16
        per-channel `scale` (out,)."""
        if tuple(signs.shape) != (spec.out_features, spec.fan_in):
            raise ConfigError(
                f"signs must have shape (out, fan_in) = {(spec.out_features, spec.fan_in)}, "
                f"got {tuple(signs.shape)}"
            )
        if scale.dtype != torch.float16 or tuple(scale.shape) != (spec.out_features,):
            raise ConfigError(
                f"scale must be float16 of shape ({spec.out_features},), got {scale.dtype} "
                f"{tuple(scale.shape)}"
            )
        layer = cls(spec, bias)
        layer.codes = pack(signs.to(torch.int64) + 1, BITS)
        layer.scale = stored_copy(scale, torch.float16)
        return layer

    def signs(self) -> Tensor:
        """The codes as -1, 0, +1, int64 of shape (out, fan_in)."""
        codes = unpack(self.codes, BITS, self.spec.numel)
        if codes.numel() and int(codes.max()) > 2:
            raise ConfigError("a stored ternary code is 3, which stands for no value")
        return (codes - 1).view(self.spec.out_features, self.spec.fan_in)

    def check_state(self) -> None:
        """Finite floats, and every code is -1, 0 or +1."""
        super().check_state()
        self.signs()

    def weight_parameter_count(self) -> int:
        return self.spec.numel + self.spec.out_features

    def reconstruct(self) -> Tensor:
        w = self.signs().to(torch.float32) * self.scale.to(torch.float32)[:, None]
        return w.view(self.spec.weight_shape)
