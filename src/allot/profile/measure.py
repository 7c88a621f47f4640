"""Measured calibration-loss changes of weight perturbations, to check second-order predictions.

The calibration loss is the sample-weighted mean of the per-batch mean losses,
L = sum_b n_b L_b / N over the data contract's calibration batches (`allot.data`), the same loss
that `allot.profile.hvp` differentiates; under `torchrun` each process sums its share of the batches
and the sums are all-reduced (`allot.distributed`). Losses are in the loss function's units (nats for
cross-entropy). The model runs in eval mode, without gradients, in its own dtype and on its own
device (batches must already be there); its training flags are restored after every call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from allot import distributed
from allot.data import Data
from allot.exceptions import ConfigError, DataError


@contextmanager
def perturbed(model: nn.Module, deltas: dict[str, Tensor]) -> Iterator[None]:
    """Add each delta to the `.weight` of the module of that qualified name, in place, for the
    duration of the block; the original weights are restored bit-exactly on exit, also on an error.

    Deltas have the weights' shapes and are cast to the weights' dtypes and devices. Every name and
    shape is checked before any weight changes.
    """
    weights = _weights(model, deltas)
    originals = {name: weight.detach().clone() for name, weight in weights.items()}
    try:
        with torch.no_grad():
            for name, weight in weights.items():
                weight.add_(deltas[name].to(dtype=weight.dtype, device=weight.device))
        yield
    finally:
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(originals[name])


def mean_loss(model: nn.Module, data: Data) -> float:
    """The calibration loss sum_b n_b L_b / N of `data`'s calibration batches, in loss units."""
    modes = [(module, module.training) for module in model.modules()]
    total, samples = 0.0, 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in distributed.shard(data.batches()):
                n = data.size(batch)
                total += n * float(data.loss(data.outputs(model, batch), batch))
                samples += n
    finally:
        for module, training in modes:
            module.training = training
    total, samples = distributed.sum_over_ranks([], [total, samples])
    if samples == 0:
        raise DataError("the batches hold no samples; measuring a loss needs at least one")
    return total / samples


def loss_change(
    model: nn.Module,
    deltas: dict[str, Tensor],
    data: Data,
    reference: float | None = None,
) -> float:
    """Measured L(w + d) - L(w), in loss units, for the weight changes `deltas` (see `perturbed`).

    `reference` is L(w); when None it is measured too (one more pass over the calibration batches), so passing it
    saves that pass when several perturbations are measured against the same weights.
    """
    with perturbed(model, deltas):
        changed = mean_loss(model, data)
    if reference is None:
        reference = mean_loss(model, data)
    return changed - reference


def _weights(model: nn.Module, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weight of every named module, after checking that each exists and fits its delta."""
    modules = dict(model.named_modules(remove_duplicate=False))
    weights: dict[str, Tensor] = {}
    for name, delta in deltas.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, Tensor):
            raise ConfigError(f"{name!r} is not a module of the model with a .weight tensor")
        if delta.shape != weight.shape:
            raise ConfigError(
                f"the delta for {name!r} has shape {tuple(delta.shape)}, but the weight has"
                f" {tuple(weight.shape)}"
            )
        if any(weight is other for other in weights.values()):
            raise ConfigError(
                f"the weight of {name!r} is tied to another listed layer; list only one"
            )
        weights[name] = weight
    return weights
