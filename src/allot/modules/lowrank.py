"""Low-rank layers: the weight as a product of two factors, run as two smaller operations.

With the weight folded to 2-D, W ~= U V where U is (out, rank) and V is (rank, fan_in). The layer
runs V as the original operation (same kernel, stride, padding, dilation) producing `rank`
channels without bias, then U as a pointwise operation from `rank` to `out` channels with the bias
(a Linear, or for a convolution one matrix product over all output positions). Two layers store
the factors differently:
- `LowRankLayer`: `u` and `v`, float32 parameters (trainable);
- `QuantizedLowRankLayer`: each factor a `QuantizedLayer` with per-row scales (`first`: V as the
  layer's own operation into `rank` channels; `second`: U as a Linear from `rank` to `out`), their
  packed codes and scales under `first.` and `second.`; the factors are dequantized on each call.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer, stored_copy
from allot.modules.quant import QuantizedLayer


class Bottleneck(CompressedLayer):
    """A layer whose weight is `u @ v` (folded to 2-D), computed as a rank-channel bottleneck;
    subclasses say how the factors are stored (`factors`)."""

    def __init__(self, spec: LayerSpec, rank: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, bias)
        self.rank = rank
        self._first = first_spec(spec, rank)

    @abc.abstractmethod
    def factors(self) -> tuple[Tensor, Tensor]:
        """The float32 factors U (out, rank) and V (rank, fan_in)."""
        ...

    def macs(self, output: Tensor) -> int:
        """Both factors: `rank * fan_in` then `out * rank` MACs per output position; the dense
        `out * fan_in` when the last inference call ran the dense product of the factors instead
        (`allot.runtime` chooses that where it is faster)."""
        if getattr(self.runner, "ran_dense", False):
            return super().macs(output)
        positions = output.numel() // self.spec.out_features
        return positions * self.rank * (self.spec.fan_in + self.spec.out_features)

    def reconstruct(self) -> Tensor:
        u, v = self.factors()
        return (u @ v).view(self.spec.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.runner is not None and not torch.is_grad_enabled():
            return self.runner(self, x)
        return self.factored(x)

    def factored(self, x: Tensor) -> Tensor:
        """The layer's outputs computed by its two factors."""
        u, v = self.factors()
        h = self._first.forward(x, v.view(self._first.weight_shape), None)
        if self.spec.kind == "linear":
            return F.linear(h, u, self.bias)
        # the pointwise second factor as one matrix product per sample over all positions, the
        # bias added by the same call: PyTorch's 1x1 convolution is several times slower on CPU
        # for few channels, and a separate bias pass costs a read and write of the output
        dims = len(self.spec.kernel_size)  # positions: the last `dims` dimensions
        flat = h.flatten(-dims)  # (rank, positions) or (batch, rank, positions)
        u = u if flat.dim() == 2 else u.expand(flat.shape[0], -1, -1)
        if self.bias is None:
            out = torch.matmul(u, flat)
        else:
            add = torch.addmm if flat.dim() == 2 else torch.baddbmm
            out = add(self.bias.view(-1, 1), u, flat)
        return out.view(*h.shape[: -dims - 1], -1, *h.shape[-dims:])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def first_spec(spec: LayerSpec, rank: int) -> LayerSpec:
    """The first factor's operation: the layer's own with `rank` outputs and no bias."""
    return spec.with_channels(out_features=rank, bias=False)


def second_spec(spec: LayerSpec, rank: int) -> LayerSpec:
    """The second factor as a Linear from `rank` inputs to the layer's outputs, no bias."""
    return LayerSpec("linear", spec.out_features, rank, bias=False)


def check_factors(spec: LayerSpec, u: Tensor, v: Tensor) -> None:
    """`ConfigError` unless `u` (out, rank) and `v` (rank, fan_in) factor a weight of `spec`."""
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


class LowRankLayer(Bottleneck):
    """A bottleneck whose factors are float32 parameters `u` and `v`."""

    def __init__(self, spec: LayerSpec, rank: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, rank, bias)
        self.u = nn.Parameter(torch.zeros(spec.out_features, rank))
        self.v = nn.Parameter(torch.zeros(rank, spec.fan_in))

    @classmethod
    def from_factors(
        cls, spec: LayerSpec, u: Tensor, v: Tensor, bias: Tensor | None = None
    ) -> LowRankLayer:
        """Build from factors `u` (out, rank) and `v` (rank, fan_in) with W ~= u @ v; stored as
        float32 copies."""
        check_factors(spec, u, v)
        layer = cls(spec, u.shape[1], bias)
        layer.u = nn.Parameter(stored_copy(u))
        layer.v = nn.Parameter(stored_copy(v))
        return layer

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.u, self.v

    def weight_parameter_count(self) -> int:
        return self.u.numel() + self.v.numel()


class QuantizedFactors(CompressedLayer):
    """What the layers with quantized factors share: `first` and `second`, two `QuantizedLayer`s
    of the same bits with per-row scales, whose weights are the factors."""

    first: QuantizedLayer
    second: QuantizedLayer

    def check_quantized(self, first: QuantizedLayer, second: QuantizedLayer) -> None:
        """`ConfigError` unless `first` and `second` are of `bits` bits with per-row scales."""
        bits = {first.bits, second.bits}
        if len(bits) > 1 or first.group is not None or second.group is not None:
            raise ConfigError("both quantized factors need the same bits and per-row scales")

    def check_state(self) -> None:
        """The factors' own checks (and the bias's finiteness)."""
        super().check_state()
        for name in ("first", "second"):
            try:
                getattr(self, name).check_state()
            except ConfigError as exc:
                raise ConfigError(f"{name}.{exc}") from exc

    def weight_parameter_count(self) -> int:
        return self.first.weight_parameter_count() + self.second.weight_parameter_count()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.first.bits}"


class QuantizedLowRankLayer(QuantizedFactors, Bottleneck):
    """A bottleneck whose factors are stored quantized: `first` holds V (the layer's operation
    into `rank` channels), `second` holds U (a Linear from `rank` to `out`), each a
    `QuantizedLayer` of `bits` bits with per-row scales."""

    def __init__(self, spec: LayerSpec, rank: int, bits: int, bias: Tensor | None = None) -> None:
        super().__init__(spec, rank, bias)
        self.first = QuantizedLayer(first_spec(spec, rank), bits)
        self.second = QuantizedLayer(second_spec(spec, rank), bits)

    @classmethod
    def from_parts(
        cls,
        spec: LayerSpec,
        first: QuantizedLayer,
        second: QuantizedLayer,
        bias: Tensor | None = None,
    ) -> QuantizedLowRankLayer:
        """Build from the quantized factors: `first` of `first_spec(spec, rank)`, `second` of
        `second_spec(spec, rank)`, both of the same bits, per-row scales."""
        rank = first.spec.out_features
        if first.spec != first_spec(spec, rank) or second.spec != second_spec(spec, rank):
            raise ConfigError(
                f"quantized factors of specs {first.spec} and {second.spec} do not factor a layer "
                f"of {spec}"
            )
        layer = cls(spec, rank, first.bits, bias)
        layer.check_quantized(first, second)
        layer.first, layer.second = first, second
        return layer

    def factors(self) -> tuple[Tensor, Tensor]:
        v = self.first.reconstruct().view(self.rank, self.spec.fan_in)
        return self.second.reconstruct(), v
