"""Codebook: adaptive quantization, one codebook of `size` float32 values per layer (LC's
adaptive quantization; k-means quantization).

The fit is the least-squares 1-D k-means of the layer's weights (`allot.schemes.kmeans`): exact
by dynamic programming where size x numel allows, else Lloyd's iterations from the previous C
step's codebook (warm start, in LC) or from the exact solution on evenly spaced order statistics.

Storage of a layer with n weights, in bits: 8 * ceil(n * b / 8) for the codes, b = ceil(log2 size),
plus 32 * size for the codebook.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.modules.base import check_layer_tensors
from allot.modules.codebook import CodebookLayer
from allot.modules.packing import packed_nbytes
from allot.modules.sparse import index_bits
from allot.schemes.base import Scheme, check_int_field, register_scheme
from allot.schemes.kmeans import kmeans_1d, nearest

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile

MAX_SIZE = 2**16


@register_scheme
@dataclasses.dataclass(frozen=True)
class Codebook(Scheme):
    """Each weight one of `size` learned values (per layer); `codebook:4` is adaptive 2-bit."""

    kind: ClassVar[str] = "codebook"
    size: int

    def __post_init__(self) -> None:
        check_int_field("Codebook", "size", self.size, 2, MAX_SIZE)

    def storage_bits(self, spec: LayerSpec) -> int:
        return 8 * packed_nbytes(spec.numel, index_bits(self.size)) + 32 * self.size

    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> CodebookLayer:
        return self.project(weight, bias, spec)

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> CodebookLayer:
        """The least-squares codebook of `target` (exact where it fits, else Lloyd's iterations
        from `previous`'s codebook when it is one of this size)."""
        check_layer_tensors(spec, target, bias)
        values = target.detach().to(torch.float64).reshape(-1).cpu().numpy()
        start = None
        if isinstance(previous, CodebookLayer) and previous.size == self.size:
            start = previous.codebook.detach().to(torch.float64).cpu().numpy()
        stored = kmeans_1d(values, self.size, start).astype(np.float32)
        codes = nearest(values, stored.astype(np.float64))
        return CodebookLayer.from_codes(
            spec, torch.from_numpy(codes), torch.from_numpy(stored), bias
        )

    def empty(self, spec: LayerSpec) -> CodebookLayer:
        return CodebookLayer(spec, self.size)

    @classmethod
    def parse_args(cls, args: list[str]) -> Codebook:
        if len(args) != 1:
            raise ValueError("expected codebook:SIZE, e.g. codebook:4 (adaptive 2-bit)")
        return cls(int(args[0]))
