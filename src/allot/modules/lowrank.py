"""Low-rank layer: the weight as a product of two float32 factors, run as two smaller operations.

With the weight folded to 2-D, W ~= U V where U is (out, rank) and V is (rank, fan_in). The layer
runs V as the original operation (same kernel, stride, padding, dilation) producing `rank`
channels without bias, then U as a pointwise operation from `rank` to `out` channels with the bias
(a Linear, or for a convolution one matrix product over all output positions). Stored
tensors: `u` and `v`, float32 parameters (trainable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy


class LowRankLayer(CompressedLayer):
    """A layer whose weight is `u @ v` (folded to 2-D), computed as a rank-channel bottleneck."""

    def __init__(self, spec: LayerSpec, rank: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, bias)
        self.rank = rank
        self.u = nn.Parameter(torch.zeros(spec.out_features, rank))
        self.v = nn.Parameter(torch.zeros(rank, spec.fan_in))
        self._first = spec.with_channels(out_features=rank, bias=False)

    @classmethod
    def from_factors(
        cls, spec: LayerSpec, u: Tensor, v: Tensor, bias: Tensor | None = None
    ) -> LowRankLayer:
        """Build from factors `u` (out, rank) and `v` (rank, fan_in) with W ~= u @ v; stored as
        float32 copies."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] or u.shape[1] < 1:
            raise ConfigError(
                f"factors must be u (out, rank) and v (rank, fan_in), got {tuple(u.shape)} and "
                f"{tuple(v.shape)}"
            )
        if u.shape[0] != spec.out_features or v.shape[1] != spec.fan_in:
            raise ConfigError(
                f"factors {tuple(u.shape)} x {tuple(v.shape)} do not fit a layer with "
                f"{spec.out_features} outputs and fan_in {spec.fan_in}"
            )
        layer = cls(spec, u.shape[1], bias)
        layer.u = nn.Parameter(stored_copy(u))
        layer.v = nn.Parameter(stored_copy(v))
        return layer

    def weight_parameter_count(self) -> int:
        return self.u.numel() + self.v.numel()

    def macs(self, output: Tensor) -> int:
        """Both factors: `rank * fan_in` then `out * rank` MACs per output position; the dense
        `out * fan_in` when the last inference call ran the dense product of the factors instead
        (`allot.runtime` chooses that where it is faster)."""
        if getattr(self.runner, "ran_dense", False):
            return super().macs(output)
        positions = output.numel() // self.spec.out_features
        return positions * self.rank * (self.spec.fan_in + self.spec.out_features)

    def reconstruct(self) -> Tensor:
        return (self.u @ self.v).view(self.spec.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.runner is not None and not torch.is_grad_enabled():
            return self.runner(self, x)
        return self.factored(x)

    def factored(self, x: Tensor) -> Tensor:
        """The layer's outputs computed by its two factors."""
        h = self._first.forward(x, self.v.view(self._first.weight_shape), None)
        if self.spec.kind == "linear":
            return F.linear(h, self.u, self.bias)
        # the pointwise second factor as one matrix product per sample over all positions, the
        # bias added by the same call: PyTorch's 1x1 convolution is several times slower on CPU
        # for few channels, and a separate bias pass costs a read and write of the output
        dims = len(self.spec.kernel_size)  # positions: the last `dims` dimensions
        flat = h.flatten(-dims)  # (rank, positions) or (batch, rank, positions)
        u = self.u if flat.dim() == 2 else self.u.expand(flat.shape[0], -1, -1)
        if self.bias is None:
            out = torch.matmul(u, flat)
        else:
            add = torch.addmm if flat.dim() == 2 else torch.baddbmm
            out = add(self.bias.view(-1, 1), u, flat)
        return out.view(*h.shape[: -dims - 1], -1, *h.shape[-dims:])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
