"""Input second moments of every layer: C = sum over calibration input patches x of x x'.

For a Linear layer, x is one input row (all leading dimensions are flattened, so a transformer's
tokens each count as one sample). Padding tokens are left out: for inputs that carry an attention mask,
a layer input whose leading dimensions are the mask's (N, T) keeps only the rows of real tokens,
since nothing computed at a padded position reaches the loss. For a convolution, x is one unfolded input
patch (in_channels x kernel volume, the same order as the folded weight), one per output position,
so |dW x|^2 summed over patches is exactly the squared output error of the layer. Each batch's
product is formed in the model's dtype (float32: about 1e-6 relative error, and faster than
float64 on CPU) and accumulated over batches in float64; additive over batches, so under `torchrun`
each process sums its share of the batches and the sums are all-reduced (`allot.distributed`).
`damped_cholesky` factors the mean second moment, damped until it is positive definite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot import distributed
from allot.data import Data, forward, token_mask
from allot.discover import Layer, LayerSpec
from allot.exceptions import ConfigError, DataError
from allot.progress import progress_bar
from allot.stats import LayerStats


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


def layer_rows(x: Tensor, spec: LayerSpec, mask: Tensor | None) -> Tensor:
    """A layer input as rows (one per input row or unfolded patch), without the rows of padding
    tokens when `mask` (the batch's real tokens, N x T) matches the input's leading dimensions."""
    x = x.detach()
    if mask is not None and x.shape[:2] == mask.shape:
        x = x[mask]
    return patches(x, spec)


@torch.no_grad()
def input_statistics(
    model: nn.Module, layers: list[Layer], data: Data, progress: bool = True
) -> dict[str, LayerStats]:
    """One pass over the calibration batches: each layer's summed input second moment (float64)
    and patch count (None and 0 for a layer no batch reaches)."""
    stats = {layer.name: LayerStats() for layer in layers}
    mask: list[Tensor | None] = [None]  # the current batch's real tokens
    handles = []
    for layer in layers:

        def hook(
            _module: nn.Module,
            args: tuple[Tensor, ...],
            name: str = layer.name,
            spec: LayerSpec = layer.spec,
        ) -> None:
            rows = layer_rows(args[0], spec, mask[0])
            entry = stats[name]
            cov = (rows.T @ rows).double()
            entry.input_cov = cov if entry.input_cov is None else entry.input_cov + cov
            entry.samples += rows.shape[0]

        handles.append(model.get_submodule(layer.name).register_forward_pre_hook(hook))
    try:
        model.eval()
        batches = distributed.shard(data.batches())
        total = distributed.shard_size(data.batch_count())
        for batch in progress_bar(batches, "input statistics", progress, total):
            inputs = data.inputs(batch)
            mask[0] = token_mask(inputs)
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return _summed_over_ranks(model, layers, stats) if distributed.active() else stats


def _summed_over_ranks(
    model: nn.Module, layers: list[Layer], stats: dict[str, LayerStats]
) -> dict[str, LayerStats]:
    """Every process's statistics summed over processes; a process whose batches did not reach a
    layer (or that had no batch) adds zeros."""
    covs = []
    for layer in layers:
        cov = stats[layer.name].input_cov
        if cov is None:
            device = model.get_submodule(layer.name).weight.device
            n = layer.spec.fan_in
            cov = torch.zeros(n, n, dtype=torch.float64, device=device)
        covs.append(cov)
    samples = distributed.sum_over_ranks(covs, [stats[layer.name].samples for layer in layers])
    return {
        layer.name: LayerStats(cov if n else None, int(n))
        for layer, cov, n in zip(layers, covs, samples, strict=True)
    }


def damped_cholesky(
    stats: LayerStats, damping: float = 1e-2, max_tries: int = 6
) -> tuple[Tensor, float]:
    """Lower Cholesky factor L (float64) of M = input_cov / samples + lam I, and the lam used.

    M and lam are in squared input units. The damping starts at lam = `damping` * mean(diag(M)),
    relative to the mean input second moment. Whenever the factorization fails (without damping, M
    is only positive semidefinite when inputs are collinear, e.g. a duplicated input feature or
    fewer samples than fan_in, and rounding can make it slightly indefinite) lam is multiplied by
    10; when it was 0 (`damping` = 0) the first retry uses 1e-10 * mean(diag(M)), well above float64
    rounding (about 1e-16 relative) yet negligible next to M. At most `max_tries` factorizations are
    tried. Raises DataError when the statistics are missing, not finite or all zero, or when the
    last try still fails.
    """
    if not damping >= 0:
        raise ConfigError(f"damping must be non-negative, got {damping}")
    if max_tries < 1:
        raise ConfigError(f"max_tries must be at least 1, got {max_tries}")
    if stats.input_cov is None or stats.samples == 0:
        raise DataError(
            "the layer has no input statistics; collect them with input_statistics over"
            " calibration data that reaches the layer"
        )
    second = stats.input_cov.double() / stats.samples
    if not bool(torch.isfinite(second).all()):
        raise DataError(
            "the layer's input second moment holds NaN or inf; check the calibration data and the"
            " activations feeding the layer for overflow"
        )
    scale = float(second.diagonal().mean())
    if scale <= 0:
        raise DataError(
            f"the layer's mean input second moment is {scale:g}, so there is no scale to damp with:"
            " its calibration inputs are all zero (or the statistics are not sums of x x');"
            " check that the calibration data reaches the layer"
        )
    identity = torch.eye(second.shape[0], dtype=second.dtype, device=second.device)
    lam = damping * scale
    for attempt in range(max_tries):
        if attempt:
            lam = lam * 10 if lam > 0 else 1e-10 * scale
        factor, info = torch.linalg.cholesky_ex(second + lam * identity)
        if int(info) == 0:
            return factor, lam
    raise DataError(
        f"the layer's input second moment ({second.shape[0]} x {second.shape[0]}) is not positive"
        f" definite even with damping {lam:g} after {max_tries} tries; raise damping or max_tries"
    )
