"""Convolutions whose second backward runs only the convolutions it needs.

PyTorch's convolution double backward (`aten::_convolution_double_backward`) computes the
weight-gradient convolution of a layer whenever the gradient of that layer's input gradient flows
in, whether or not anything asks for it. Second backward passes through a first backward's graph
(Hessian-vector products) hit this on every convolution between the loss and the layer asked
about, so about a third of a block HVP's convolutions were wasted. ResNet-20, lock-step block
product of all layers: 0.64 of the plain double backward's time (bench/hvp_cost.py).

`split_convolutions()` routes `conv1d/2d/3d` calls through two autograd nodes whose sum is the
convolution: one carries the gradient to the input (a transposed convolution, differentiable in
the output gradient and the weight), the other the gradient to the weight (and adds zeros to the
output). The autograd engine then skips the weight node wherever that weight is not needed. The
values and all derivatives are those of the plain convolution; only the work differs. Calls with
string padding ("same", "valid") run the plain convolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

_CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# (stride, padding, dilation, groups) with one entry per spatial dimension
_Geometry = tuple[list[int], list[int], list[int], int]


class _InputPath(Function):
    """conv(x, w), with its gradient to x only (w's gradient comes from `_WeightPath`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, geometry: _Geometry) -> Tensor:  # type: ignore[override]
        stride, padding, dilation, groups = geometry
        ctx.save_for_backward(w)
        ctx.geometry, ctx.input_shape = geometry, x.shape
        zeros = [0] * (w.dim() - 2)
        return torch.ops.aten.convolution(
            x, w, None, stride, padding, dilation, False, zeros, groups
        )

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (w,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        spatial = range(w.dim() - 2)
        # output_padding recovers the input sizes that a strided convolution rounded away
        extra = [
            ctx.input_shape[2 + a]
            - (
                (grad.shape[2 + a] - 1) * stride[a]
                - 2 * padding[a]
                + dilation[a] * (w.shape[2 + a] - 1)
                + 1
            )
            for a in spatial
        ]
        transposed = _TRANSPOSED[w.dim() - 2]
        return transposed(grad, w, None, stride, padding, extra, groups, dilation), None, None


class _WeightPath(Function):
    """Zeros shaped like conv(x, w), with the convolution's gradient to w.

    The input arrives wrapped in a list so that autograd records no edge to it: the engine then
    runs this node only when w's gradient is needed, and the weight gradient computed here still
    depends on x's history (for cross-layer Hessian terms)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, w: Tensor, wrapped: list[Tensor], geometry: _Geometry, shape: torch.Size
    ) -> Tensor:
        ctx.save_for_backward(w)
        ctx.input, ctx.geometry = wrapped[0], geometry
        return w.new_zeros(()).expand(shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        zeros = [0] * (w.dim() - 2)
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            grad,
            ctx.input,
            w,
            None,
            stride,
            padding,
            dilation,
            False,
            zeros,
            groups,
            [False, True, False],
        )
        return grad_w, None, None, None


def _per_dimension(value: int | tuple[int, ...] | list[int], dims: int) -> list[int]:
    return list(value) if isinstance(value, tuple | list) else [value] * dims


def _convolution(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor | None:
    """The split convolution, or None where the plain one should run."""
    if isinstance(padding, str) or not (input.requires_grad or weight.requires_grad):
        return None
    dims = weight.dim() - 2
    geometry = (
        _per_dimension(stride, dims),
        _per_dimension(padding, dims),
        _per_dimension(dilation, dims),
        groups,
    )
    output = _InputPath.apply(input, weight, geometry)
    if weight.requires_grad:
        output = output + _WeightPath.apply(weight, [input], geometry, output.shape)
    if bias is not None:
        output = output + bias.view(1, -1, *[1] * dims)
    return output


class _SplitMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            output = _convolution(*args, **kwargs)
            if output is not None:
                return output
        return func(*args, **kwargs)


@contextmanager
def split_convolutions(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s convolutions build the split graph (see the module docstring).

    Nothing changes for a model without Conv1d/2d/3d modules, so no per-call dispatch is paid."""
    has_conv = any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())
    with _SplitMode() if has_conv else nullcontext():
        yield
