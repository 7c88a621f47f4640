"""Find the compressible layers of any `nn.Module`.

A *layer* is a Linear, Conv1d or Conv2d module, named by its qualified name. Layers that cannot be
compressed yet (grouped or depthwise convolutions, non-zero padding modes) and layers whose weight is
shared with an earlier layer are reported in `Discovery.skipped` with the reason, and kept in float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from allot.exceptions import PlanError

_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of a compressible layer: enough to run its operation without the original module.

    `kernel_size`, `stride` and `dilation` are empty tuples for Linear layers. `padding` is a tuple
    of ints or the string "same"/"valid" as torch accepts it.
    """

    kind: str
    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    bias: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _KINDS.values():
            raise PlanError(
                f"layer kind must be one of {sorted(_KINDS.values())}, got {self.kind!r}"
            )
        if self.out_features < 1 or self.in_features < 1:
            raise PlanError("layer features must be positive")
        dims = len(self.kernel_size)
        if self.kind != "linear" and dims != int(self.kind[4]):
            raise PlanError(
                f"a {self.kind} layer needs a {self.kind[4]}-d kernel_size, got {self.kernel_size}"
            )
        # Conv defaults as in torch: stride 1, no padding, no dilation.
        for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            if getattr(self, name) == ():
                object.__setattr__(self, name, (default,) * dims)

    @property
    def fan_in(self) -> int:
        """Inputs per output unit: in_features times the kernel volume."""
        return self.in_features * math.prod(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def numel(self) -> int:
        """Number of weights (the bias is not counted)."""
        return self.out_features * self.fan_in

    def with_channels(
        self,
        out_features: int | None = None,
        in_features: int | None = None,
        kernel_size: tuple[int, ...] | None = None,
        bias: bool | None = None,
        pointwise: bool = False,
    ) -> LayerSpec:
        """A spec of the same kind with other channel counts; `pointwise` makes a 1x1, stride-1 op."""
        k = tuple(1 for _ in self.kernel_size) if pointwise else self.kernel_size
        return LayerSpec(
            kind=self.kind,
            out_features=self.out_features if out_features is None else out_features,
            in_features=self.in_features if in_features is None else in_features,
            kernel_size=k if kernel_size is None else kernel_size,
            stride=tuple(1 for _ in self.stride) if pointwise else self.stride,
            padding=tuple(0 for _ in self.kernel_size) if pointwise else self.padding,
            dilation=tuple(1 for _ in self.dilation) if pointwise else self.dilation,
            bias=self.bias if bias is None else bias,
        )

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Run the layer's operation with the given (dense, float) weight of shape `weight_shape`."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, weight, bias, self.stride, self.padding, self.dilation)

    def macs(self, output_positions: int) -> int:
        """Multiply-accumulates for one sample, given the number of output positions per channel."""
        return self.numel * output_positions

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerSpec:
        try:
            padding = data["padding"]
            return cls(
                kind=data["kind"],
                out_features=int(data["out_features"]),
                in_features=int(data["in_features"]),
                kernel_size=tuple(int(v) for v in data["kernel_size"]),
                stride=tuple(int(v) for v in data["stride"]),
                padding=padding if isinstance(padding, str) else tuple(int(v) for v in padding),
                dilation=tuple(int(v) for v in data["dilation"]),
                bias=bool(data["bias"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"invalid layer spec {data!r}: {exc}") from exc

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerSpec:
        """Spec of a Linear/Conv1d/Conv2d module (call `unsupported_reason` first)."""
        kind = _KINDS[type(module)]
        if kind == "linear":
            return cls(kind, module.out_features, module.in_features, bias=module.bias is not None)
        return cls(
            kind,
            module.out_channels,
            module.in_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
            module.bias is not None,
        )


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linear/Conv module cannot be compressed (None when it can)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped/depthwise convolution (groups={module.groups}) is not supported; kept in float"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported; kept in float"
    return None


@dataclass(frozen=True)
class Layer:
    """A compressible layer: its qualified name and geometry."""

    name: str
    spec: LayerSpec


@dataclass
class Discovery:
    """The result of `discover`: compressible layers in module order, and what was skipped and why."""

    layers: list[Layer]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def discover(model: nn.Module) -> Discovery:
    """Find compressible layers (exact types Linear, Conv1d, Conv2d) in module order.

    Subclasses of those types are skipped: their forward may do something the spec cannot replay.
    A layer whose weight tensor is shared with an earlier layer (tied weights) is skipped too, so a
    shared weight is compressed once, through its first user.
    """
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if type(module) not in _KINDS:
            continue
        reason = unsupported_reason(module)
        key = id(module.weight)
        if reason is None and key in owners:
            reason = f"weight is shared with {owners[key]} (tied); compressed there only"
        owners.setdefault(key, name)
        if reason is not None:
            skipped[name] = reason
            continue
        layers.append(Layer(name, LayerSpec.from_module(module)))
    return Discovery(layers, skipped)


def get_weight(model: nn.Module, name: str) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) tensors of a float layer, detached."""
    module = model.get_submodule(name)
    bias = module.bias.detach() if module.bias is not None else None
    return module.weight.detach(), bias


def fold_weight_2d(weight: Tensor) -> Tensor:
    """Fold a weight to 2-D (out, in * kernel volume), the matrix every scheme works on."""
    return weight.reshape(weight.shape[0], -1)
