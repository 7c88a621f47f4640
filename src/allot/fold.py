"""Fold BatchNorm into the convolution before it, as deployment does (and AIMET, NNCF before
quantizing): the compressed weight is then the weight that really runs, and the artifact stores no
normalisation statistics.

Pairs are found on the traced graph (torch.fx): a Conv1d/Conv2d whose only user is a BatchNorm1d/2d
in eval mode. Models that cannot be traced (data-dependent control flow) are not folded; the reason
is returned so the caller can report it.
"""

from __future__ import annotations

import torch
from torch import nn

from allot.exceptions import PlanError

_PAIRS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}


def check_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """`PlanError` unless every pair names a Conv1d/Conv2d and a BatchNorm of the same dimension
    and channel count in `model` (a plan's `folded` list is checked before it is applied)."""
    modules = dict(model.named_modules())
    for names in zip(*pairs, strict=True) if pairs else ():
        if len(set(names)) != len(names):
            raise PlanError("plan.folded: a module appears in two pairs")
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if (
            type(conv) not in _PAIRS
            or type(bn) is not _PAIRS[type(conv)]
            or conv.out_channels != bn.num_features
        ):
            raise PlanError(
                f"plan.folded: the model has no convolution {conv_name!r:.60} followed by its "
                f"BatchNorm {bn_name!r:.60}; is it a plan for another model?"
            )


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """(conv, batchnorm) name pairs that can be folded, and why none could be looked for (or None)."""
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
        return [], None
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        return [], f"BatchNorm not folded: the model cannot be traced ({type(exc).__name__})"
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        conv = model.get_submodule(node.target)
        (user,) = node.users
        if user.op != "call_module" or type(conv) not in _PAIRS:
            continue
        bn = model.get_submodule(user.target)
        if type(bn) is _PAIRS[type(conv)] and bn.track_running_stats and conv.groups == 1:
            pairs.append((node.target, user.target))
    return pairs, None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold each BatchNorm (eval statistics) into its conv, in place; the BatchNorm becomes Identity.

    w' = w * gamma / sqrt(var + eps) per output channel; b' = beta + (b - mean) * gamma / sqrt(var + eps).
    `PlanError` when a pair does not name a conv and its BatchNorm (`check_pairs`).
    """
    check_pairs(model, pairs)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        gain = bn.running_var.add(bn.eps).rsqrt()
        if bn.affine:
            gain = gain * bn.weight
        shift = bn.bias if bn.affine else torch.zeros_like(gain)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(gain)
        conv.weight.mul_(gain.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(shift + (bias - bn.running_mean) * gain)
        model.set_submodule(bn_name, nn.Identity())
    return model


def fold_structure(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """The structure of a folded model (conv with bias, BatchNorm replaced), values not folded.

    Used when loading an artifact: its state dict holds the folded values. `PlanError` when a
    pair does not name a conv and its BatchNorm (`check_pairs`).
    """
    check_pairs(model, pairs)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
        model.set_submodule(bn_name, nn.Identity())
    return model
