"""Keep: leave the layer as a plain float32 layer. Storage in bits: 32 * numel."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.modules.base import build_float_layer
from allot.schemes.base import Scheme, register_scheme

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile


@register_scheme
@dataclasses.dataclass(frozen=True)
class Keep(Scheme):
    """No compression: a plain float32 nn.Linear/Conv1d/Conv2d; `keep`."""

    kind: ClassVar[str] = "keep"

    def storage_bits(self, spec: LayerSpec) -> int:
        return 32 * spec.numel

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> nn.Module:
        return build_float_layer(spec, weight.detach(), None if bias is None else bias.detach())

    @property
    def constrains(self) -> bool:
        """A kept layer's weight is free: it is stored as it is."""
        return False

    def empty(self, spec: LayerSpec) -> nn.Module:
        bias = torch.zeros(spec.out_features) if spec.bias else None
        return build_float_layer(spec, torch.zeros(spec.weight_shape), bias)

    @classmethod
    def parse_args(cls, args: list[str]) -> Keep:
        if args:
            raise ValueError("keep takes no arguments")
        return cls()
