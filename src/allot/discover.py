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
_PADDING_MODES = ("same", "valid")
MAX_WEIGHTS = 2**40
"""Most weights of one layer (4 TiB in float32); a bound on what a plan may claim."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
                f"layer kind must be one of {sorted(_KINDS.values())}, got {self.kind!r:.40}"
            )
        for name in ("out_features", "in_features"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PlanError(f"{name} must be a positive int, got {value!r:.40}")
        if not isinstance(self.bias, bool):
            raise PlanError(f"bias must be true or false, got {self.bias!r:.40}")
        dims = 0 if self.kind == "linear" else int(self.kind[4])
        # Conv defaults as in torch: stride 1, no padding, no dilation.
        for name, low, default in (
            ("kernel_size", 1, None),
            ("stride", 1, 1),
            ("padding", 0, 0),
            ("dilation", 1, 1),
        ):
            value = getattr(self, name)
            if name == "padding" and isinstance(value, str):
                if value not in _PADDING_MODES or dims == 0:
                    raise PlanError(
                        f"padding must be a tuple of ints or one of {_PADDING_MODES} for a "
                        f"convolution, got {value!r:.40}"
                    )
                continue
            if isinstance(value, list):
                value = tuple(value)
            if default is not None and value == ():
                value = (default,) * dims
            if (
                not isinstance(value, tuple)
                or len(value) != dims
                or not all(_is_int(v) and v >= low for v in value)
            ):
                what = "empty" if dims == 0 else f"{dims} ints >= {low}"
                raise PlanError(f"a {self.kind} layer's {name} must be {what}, got {value!r:.60}")
            object.__setattr__(self, name, value)
        if isinstance(self.padding, str) and any(s != 1 for s in self.stride):
            raise PlanError(f"padding={self.padding!r} needs stride 1, got {self.stride}")
        if max(self.out_features, self.fan_in, self.numel) > MAX_WEIGHTS:
            raise PlanError(
                f"a layer of {self.out_features} x {self.fan_in} weights is beyond the "
                f"{MAX_WEIGHTS:,} weights allot handles in one layer"
            )

    def differences(self, other: LayerSpec) -> list[str]:
        """What differs from `other`, field by field, e.g. "padding 'same' vs (1, 1)"."""
        return [
            f"{name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in (
                "kind",
                "out_features",
                "in_features",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "bias",
            )
            if getattr(self, name) != getattr(other, name)
        ]

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
        """Rebuild from `to_json`'s form; `PlanError` naming the field when one is missing or not
        exactly of its type (3.7 is no kernel size, "false" no bias)."""
        fields = ("kind", "out_features", "in_features", "kernel_size", "stride", "padding")
        missing = [k for k in (*fields, "dilation", "bias") if k not in data]
        if missing:
            raise PlanError(f"layer spec: missing {', '.join(missing)}")
        unknown = sorted(set(data) - {*fields, "dilation", "bias"})
        if unknown:
            raise PlanError(f"layer spec: unknown field(s) {unknown!r:.80}")
        for name in ("kernel_size", "stride", "dilation", "padding"):
            value = data[name]
            if not isinstance(value, list) and not (name == "padding" and isinstance(value, str)):
                raise PlanError(f"layer spec: {name} must be a list, got {value!r:.40}")
        padding = data["padding"]
        return cls(
            kind=data["kind"],
            out_features=data["out_features"],
            in_features=data["in_features"],
            kernel_size=tuple(data["kernel_size"]),
            stride=tuple(data["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(data["dilation"]),
            bias=data["bias"],
        )

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


def _subclass_reason(cls: type, base: type) -> str:
    return (
        f"{cls.__name__} subclasses nn.{base.__name__}, and a subclass may compute something else "
        f"than nn.{base.__name__}.forward, which the compressed layer runs; kept in float (build "
        f"the layer as a plain nn.{base.__name__} to compress it)"
    )


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

    Subclasses of those types are skipped, with the reason in `skipped`: their forward may do
    something the spec cannot replay. A layer whose weight tensor is shared with an earlier layer (tied weights) is skipped too, so a
    shared weight is compressed once, through its first user.
    """
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if type(module) not in _KINDS:
            base = next((k for k in _KINDS if isinstance(module, k)), None)
            if base is not None:
                skipped[name] = _subclass_reason(type(module), base)
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
