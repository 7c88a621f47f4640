"""Input second moments of every layer: C = sum over calibration input patches x of x x'.

For a Linear layer, x is one input row (all leading dimensions are flattened, so a transformer's
tokens each count as one sample, padding tokens included). For a convolution, x is one unfolded input
patch (in_channels x kernel volume, the same order as the folded weight), one per output position,
so |dW x|^2 summed over patches is exactly the squared output error of the layer. Accumulated in
float64; additive over batches (and so over processes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.discover import Layer, LayerSpec
from allot.progress import progress_bar
from allot.stats import LayerStats
from allot.zoo.data import Batch, forward


def patches(x: Tensor, spec: LayerSpec) -> Tensor:
    """The layer's input as a matrix of patch rows (n_patches, fan_in), matching the folded weight."""
    if spec.kind == "linear":
        return x.reshape(-1, spec.in_features)
    if spec.kind == "conv1d":
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *spec.kernel_size), (1, *spec.stride), (1, *spec.dilation)
        padding = spec.padding if isinstance(spec.padding, str) else (0, *spec.padding)
    else:
        kernel, stride, dilation, padding = (
            spec.kernel_size,
            spec.stride,
            spec.dilation,
            spec.padding,
        )
    if isinstance(padding, str):
        x, padding = _explicit_padding(x, padding, kernel, dilation), 0
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, spec.fan_in)


def _explicit_padding(
    x: Tensor, mode: str, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    if mode == "valid":
        return x
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


@torch.no_grad()
def input_statistics(
    model: nn.Module, layers: list[Layer], batches: Iterable[Batch], progress: bool = True
) -> dict[str, LayerStats]:
    """One pass over `batches`: each layer's summed input second moment (float64) and patch count."""
    stats = {layer.name: LayerStats() for layer in layers}
    handles = []
    for layer in layers:

        def hook(
            _module: nn.Module,
            args: tuple[Tensor, ...],
            name: str = layer.name,
            spec: LayerSpec = layer.spec,
        ) -> None:
            rows = patches(args[0].detach(), spec).double()
            entry = stats[name]
            cov = rows.T @ rows
            entry.input_cov = cov if entry.input_cov is None else entry.input_cov + cov
            entry.samples += rows.shape[0]

        handles.append(model.get_submodule(layer.name).register_forward_pre_hook(hook))
    try:
        model.eval()
        for inputs, _targets in progress_bar(list(batches), "input statistics", progress):
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats
