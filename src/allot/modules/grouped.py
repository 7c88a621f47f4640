"""Grouped low-rank layers (ALDS): the input channels split into `groups` consecutive groups, each
group's weight a rank-`rank` product, run as a grouped operation followed by a pointwise one.

With the weight folded to 2-D and its columns split by input channel group,
W ~= [U_1 V_1, ..., U_k V_k]: U_i is (out, rank), V_i is (rank, in/k * kernel volume). The layer
runs all V_i at once as a grouped convolution (k groups, `rank` outputs each, the layer's kernel,
stride, padding and dilation; for a Linear layer the block-diagonal product), giving k * rank
channels without bias, then [U_1 ... U_k] as a pointwise operation (1x1 convolution or Linear) from
k * rank to `out` channels with the bias. k = 1 is `LowRankLayer`'s factorisation, run the same
way. Two layers store the factors `u` (out, k * rank) and `v` (k * rank, in/k * kernel volume)
differently:
- `GroupedLayer`: float32 parameters (trainable);
- `QuantizedGroupedLayer`: each a `QuantizedLayer` with per-row scales (`first`: V, of the
  layer's kind with k * rank outputs and in/k input channels; `second`: U, a Linear), under
  `first.` and `second.`; the factors are dequantized on each call.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.lowrank import QuantizedFactors, second_spec
from allot.modules.quant import QuantizedLayer


def grouped_first_spec(spec: LayerSpec, groups: int, rank: int) -> LayerSpec:
    """The stacked first factors V as one layer: the layer's kind and kernel, `groups * rank`
    outputs, in / `groups` input channels (fan_in / groups), no bias."""
    return spec.with_channels(
        out_features=groups * rank, in_features=spec.in_features // groups, bias=False
    )


class GroupedBottleneck(CompressedLayer):
    """A layer whose folded weight is `[u_1 v_1, ..., u_k v_k]` over k input-channel groups;
    subclasses say how the factors are stored (`factors`)."""

    def __init__(self, spec: LayerSpec, groups: int, rank: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, bias)
        if groups < 1 or spec.in_features % groups:
            raise ConfigError(
                f"{groups} groups do not divide the layer's {spec.in_features} input channels"
            )
        self.groups = groups
        self.rank = rank
        self.group_fan_in = spec.fan_in // groups
        self._pointwise = spec.with_channels(in_features=groups * rank, pointwise=True)

    @abc.abstractmethod
    def factors(self) -> tuple[Tensor, Tensor]:
        """The float32 factors u (out, groups * rank) and v (groups * rank, fan_in / groups)."""
        ...

    def macs(self, output: Tensor) -> int:
        """Both operations: `groups * rank * fan_in / groups` then `out * groups * rank` MACs
        per output position."""
        positions = output.numel() // self.spec.out_features
        width = self.groups * self.rank
        return positions * width * (self.group_fan_in + self.spec.out_features)

    def reconstruct(self) -> Tensor:
        k, j, s = self.groups, self.rank, self.spec
        u, v = self.factors()
        blocks = torch.einsum("okj,kjm->okm", u.view(s.out_features, k, j), v.view(k, j, -1))
        return blocks.reshape(s.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        s, k = self.spec, self.groups
        u, v = self.factors()
        if s.kind == "linear":
            parts = x.unflatten(-1, (k, s.in_features // k))
            hidden = torch.einsum("...km,kjm->...kj", parts, v.view(k, self.rank, -1))
            hidden = hidden.flatten(-2)
        else:
            conv = F.conv1d if s.kind == "conv1d" else F.conv2d
            weight = v.view(k * self.rank, s.in_features // k, *s.kernel_size)
            hidden = conv(x, weight, None, s.stride, s.padding, s.dilation, k)
        return self._pointwise.forward(hidden, u.view(self._pointwise.weight_shape), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}, rank={self.rank}"


class GroupedLayer(GroupedBottleneck):
    """Grouped factors stored as float32 parameters `u` and `v`."""

    def __init__(self, spec: LayerSpec, groups: int, rank: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, groups, rank, bias)
        self.u = nn.Parameter(torch.zeros(spec.out_features, groups * rank))
        self.v = nn.Parameter(torch.zeros(groups * rank, self.group_fan_in))

    @classmethod
    def from_factors(
        cls, spec: LayerSpec, u: Tensor, v: Tensor, groups: int, bias: Tensor | None = None
    ) -> GroupedLayer:
        """Build from `u` (out, groups * rank) and `v` (groups * rank, fan_in / groups), whose
        rank-sized blocks are the factors of each group in order; stored as float32 copies."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] or u.shape[1] % groups:
            raise ConfigError(
                f"factors must be u (out, groups * rank) and v (groups * rank, fan_in / groups) "
                f"for {groups} groups, got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        if u.shape[0] != spec.out_features or v.shape[1] * groups != spec.fan_in:
            raise ConfigError(
                f"factors {tuple(u.shape)} x {tuple(v.shape)} in {groups} groups do not fit a layer "
                f"with {spec.out_features} outputs and fan_in {spec.fan_in}"
            )
        layer = cls(spec, groups, u.shape[1] // groups, bias)
        layer.u = nn.Parameter(stored_copy(u))
        layer.v = nn.Parameter(stored_copy(v))
        return layer

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.u, self.v

    def weight_parameter_count(self) -> int:
        return self.u.numel() + self.v.numel()


class QuantizedGroupedLayer(QuantizedFactors, GroupedBottleneck):
    """Grouped factors stored quantized: `first` holds the stacked V (`grouped_first_spec`),
    `second` holds U (a Linear from groups * rank to out), each a `QuantizedLayer` of `bits` bits
    with per-row scales."""

    def __init__(
        self, spec: LayerSpec, groups: int, rank: int, bits: int, bias: Tensor | None = None
    ) -> None:
        super().__init__(spec, groups, rank, bias)
        self.first = QuantizedLayer(grouped_first_spec(spec, groups, rank), bits)
        self.second = QuantizedLayer(second_spec(spec, groups * rank), bits)

    @classmethod
    def from_parts(
        cls,
        spec: LayerSpec,
        groups: int,
        first: QuantizedLayer,
        second: QuantizedLayer,
        bias: Tensor | None = None,
    ) -> QuantizedGroupedLayer:
        """Build from the quantized factors: `first` of `grouped_first_spec(spec, groups, rank)`,
        `second` of `second_spec(spec, groups * rank)`, the same bits, per-row scales."""
        rank = first.spec.out_features // max(groups, 1)
        if first.spec != grouped_first_spec(spec, groups, rank) or second.spec != second_spec(
            spec, groups * rank
        ):
            raise ConfigError(
                f"quantized factors of specs {first.spec} and {second.spec} do not factor a layer "
                f"of {spec} in {groups} groups"
            )
        layer = cls(spec, groups, rank, first.bits, bias)
        layer.check_quantized(first, second)
        layer.first, layer.second = first, second
        return layer

    def factors(self) -> tuple[Tensor, Tensor]:
        v = self.first.reconstruct().view(self.groups * self.rank, self.group_fan_in)
        return self.second.reconstruct(), v
