"""The base of compressed layers, and what they share with plain float layers.

A compressed layer is an `nn.Module` whose state dict holds exactly the compressed form (packed
codes, scales, factors, sparse values and indices) plus the layer's float bias under the key
`bias`, as in `nn.Linear`/`nn.Conv*d`. Its storage is what its state dict holds, so the bits a
scheme promises are the bytes a saved artifact really takes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError

FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _check_bias(spec: LayerSpec, bias: Tensor | None) -> None:
    if spec.bias != (bias is not None):
        given = "given" if bias is not None else "not given"
        raise ConfigError(f"the layer spec says bias={spec.bias} but a bias was {given}")
    if bias is not None and tuple(bias.shape) != (spec.out_features,):
        raise ConfigError(
            f"bias of shape {tuple(bias.shape)} does not fit {spec.out_features} output features"
        )


def check_layer_tensors(spec: LayerSpec, weight: Tensor, bias: Tensor | None) -> None:
    """Raise `ConfigError` when `weight`/`bias` do not have the shapes the spec describes."""
    if tuple(weight.shape) != spec.weight_shape:
        raise ConfigError(
            f"weight of shape {tuple(weight.shape)} does not fit the layer spec, which expects "
            f"{spec.weight_shape}"
        )
    _check_bias(spec, bias)


def stored_copy(tensor: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A detached, contiguous copy in `dtype`, fit to be stored (safetensors refuses strided
    views)."""
    return tensor.detach().to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)


class CompressedLayer(nn.Module, abc.ABC):
    """A layer that stores its weight in compressed form and rebuilds it on the fly.

    Subclasses register their stored tensors (buffers or parameters) and implement `reconstruct`.
    The bias, when the spec has one, is a float32 parameter named `bias`; when `bias` is not given
    it starts at zero (for a module about to receive a state dict).

    `runner`, when set (only by `allot.runtime`, on request), computes the layer's outputs instead
    of rebuilding the dense weight on every call: a cached dense weight or a low-bit kernel. It
    runs only without gradients (inference), so training and anything differentiated always see
    the stored tensors.
    """

    runner: Callable[[CompressedLayer, Tensor], Tensor] | None = None

    def __init__(self, spec: LayerSpec, bias: Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        if spec.bias and bias is None:
            bias = torch.zeros(spec.out_features)
        _check_bias(spec, bias)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(stored_copy(bias))

    @abc.abstractmethod
    def reconstruct(self) -> Tensor:
        """The dense float32 weight of shape `spec.weight_shape` that this layer stands for."""
        ...

    def check_state(self) -> None:
        """`ConfigError` naming the tensor when the stored state is not one this layer can hold:
        called on every compressed layer of a loaded artifact (untrusted input) once its tensors
        are in. By default every float tensor must be finite; subclasses add their own ranges
        (dtypes and shapes are checked against `empty` before loading)."""
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ConfigError(f"{name} holds NaN or infinite values")

    @property
    def rebuilds_weight(self) -> bool:
        """Whether the forward pass rebuilds the dense weight on every call (the base forward),
        rather than running the layer's own operations (low-rank factors, say)."""
        return type(self).forward is CompressedLayer.forward

    def forward(self, x: Tensor) -> Tensor:
        if self.runner is not None and not torch.is_grad_enabled():
            return self.runner(self, x)
        return self.spec.forward(x, self.reconstruct(), self.bias)

    @abc.abstractmethod
    def weight_parameter_count(self) -> int:
        """How many numbers define the weight (see `parameter_count`)."""
        ...

    def parameter_count(self) -> int:
        """How many numbers the layer stores, bias included: packed codes count one per weight they
        encode, plus scales, offsets, factor entries or kept values; sparse positions are
        structure and do not count."""
        return self.weight_parameter_count() + (0 if self.bias is None else self.bias.numel())

    def macs(self, output: Tensor) -> int:
        """Multiply-accumulates that produced `output` (this layer's output for a whole batch), as
        this layer executes: dense, `fan_in` per output element, unless a subclass runs smaller
        operations."""
        return output.numel() * self.spec.fan_in

    def storage_bits(self) -> int:
        """Bits of every stored tensor except the bias, at its stored width (8 per byte)."""
        return sum(
            8 * t.numel() * t.element_size()
            for name, t in self.state_dict().items()
            if name != "bias"
        )

    def extra_repr(self) -> str:
        s = self.spec
        shape = "x".join(str(v) for v in s.weight_shape)
        return f"{s.kind}, weight {shape}, bias={s.bias}"


def layer_storage_bits(module: nn.Module) -> int:
    """Bits a layer's weight occupies (bias excluded): a compressed layer's stored tensors, or a
    plain float Linear/Conv1d/Conv2d weight at its dtype's width (32 bits per weight in float32)."""
    if isinstance(module, CompressedLayer):
        return module.storage_bits()
    if isinstance(module, FLOAT_LAYERS):
        return 8 * module.weight.numel() * module.weight.element_size()
    raise TypeError(f"not a layer allot can measure: {type(module).__name__}")


def dense_weight(module: nn.Module) -> Tensor:
    """The dense weight a compressed or plain float layer computes with, shape
    `(out, in, *kernel)`."""
    if isinstance(module, CompressedLayer):
        return module.reconstruct()
    if isinstance(module, FLOAT_LAYERS):
        return module.weight
    raise TypeError(f"not a layer allot can read a weight from: {type(module).__name__}")


def build_float_layer(spec: LayerSpec, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A plain float32 nn.Linear/Conv1d/Conv2d with the spec's geometry (stride, padding,
    dilation) holding copies of `weight` and `bias`; the storage of the Keep scheme."""
    check_layer_tensors(spec, weight, bias)
    if spec.kind == "linear":
        layer: nn.Module = nn.Linear(
            spec.in_features, spec.out_features, bias=spec.bias, device=weight.device
        )
    else:
        conv = nn.Conv1d if spec.kind == "conv1d" else nn.Conv2d
        layer = conv(
            spec.in_features,
            spec.out_features,
            spec.kernel_size,
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            bias=spec.bias,
            device=weight.device,
        )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer
