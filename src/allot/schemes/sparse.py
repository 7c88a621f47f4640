"""Sparse: keep the largest-magnitude weights in float32, with bit-packed positions.

Storage of a layer with n weights keeping k = max(1, floor(density * n + 0.5)) of them, in bits:
32 * k for the values + 8 * ceil(k * b / 8) for the positions, b = max(1, ceil(log2 n)).

The fit is the exact least-squares projection onto {at most k non-zeros} (l0-constrained pruning:
keep the k largest |w|). With an `l1` radius it is the projection onto {at most k non-zeros,
sum |w| <= l1} (LC's l1-constrained pruning, with the storage of k slots): the k largest |w| are
an optimal support (shrinking them all by one threshold never favours a smaller entry), and their
values are projected onto the l1 ball of that radius by soft-thresholding (Duchi et al. 2008).
The radius is in the weight's own units, for the whole layer, as LC's kappa is.
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


def l1_ball(values: Tensor, radius: float) -> Tensor:
    """The Euclidean projection of a vector onto {x : sum |x| <= radius}, float64: soft
    thresholding at the theta that makes the l1 norm equal the radius (`values` as they are when
    already inside)."""
    v = values.detach().to(torch.float64).reshape(-1)
    if float(v.abs().sum()) <= radius:
        return v
    u = v.abs().sort(descending=True).values
    sums = u.cumsum(0)
    counts = torch.arange(1, u.numel() + 1, dtype=torch.float64, device=u.device)
    active = int((u - (sums - radius) / counts > 0).nonzero().max()) + 1
    theta = (float(sums[active - 1]) - radius) / active
    return torch.sign(v) * (v.abs() - theta).clamp(min=0)


@register_scheme
@dataclasses.dataclass(frozen=True)
class Sparse(Scheme):
    """Keep a fraction `density` in (0, 1] of the weights (largest magnitude); `sparse:0.05`.
    With `l1`, the kept values are projected onto the l1 ball of that radius;
    `sparse:0.05:l1=2.5`."""

    kind: ClassVar[str] = "sparse"
    density: float
    l1: float | None = None

    def __post_init__(self) -> None:
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ConfigError(f"Sparse.density must be a number in (0, 1], got {d!r:.40}")
        object.__setattr__(self, "density", float(d))
        r = self.l1
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf:
                raise ConfigError(f"Sparse.l1 must be a positive finite radius, got {r!r}")
            object.__setattr__(self, "l1", float(r))

    def label(self) -> str:
        return f"sparse{self.density}" + (f"-l1={self.l1}" if self.l1 is not None else "")

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
        if self.l1 is not None:
            values = l1_ball(values, self.l1)
        return SparseLayer.from_values(spec, positions, values, bias)

    def empty(self, spec: LayerSpec) -> SparseLayer:
        return SparseLayer(spec, self.kept(spec))

    @classmethod
    def parse_args(cls, args: list[str]) -> Sparse:
        usage = "expected sparse:DENSITY[:l1=RADIUS], e.g. sparse:0.05 or sparse:0.05:l1=2.5"
        if not 1 <= len(args) <= 2 or (len(args) == 2 and not args[1].startswith("l1=")):
            raise ValueError(usage)
        return cls(float(args[0]), float(args[1][3:]) if len(args) == 2 else None)
