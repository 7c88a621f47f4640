"""Error feedback: re-fit a plan's layers in order, each on the inputs the already compressed
layers before it really produce, towards the float model's outputs. Every layer whose scheme
says it can be re-fitted to input statistics (`Scheme.refits`: steered quantization, the
whitened low-rank fit, and a sum holding either) is re-fitted; the others stay as applied.

Steering fits every layer alone, on the float model's inputs. Once a plan is applied, layer l
sees inputs x_q that the compressed layers before it have moved away from the float inputs x_f.
Refining layer l then minimises, over its quantized weight W~ (codes and grid, at the plan's bits),

    sum ||W x_f - W~ x_q||^2 + lam ||W~ - W||^2    (summed over calibration rows or patches)

which is (W~ - T)(M_qq + lam I)(W~ - T)' up to a constant, with M_qq = sum x_q x_q' and the target

    T = (W M_fq + lam W) (M_qq + lam I)^-1,     M_fq = sum x_f x_q'.

The ridge term pulls T towards the float weight where the inputs do not determine it (fewer rows
than inputs), and T = W exactly when nothing upstream changed (x_q = x_f). lam is `DAMPING` times
the mean diagonal of M_qq, as in steering. The layer's scheme and storage stay the plan's: the
scheme fits the target under M_qq (`Scheme.refit`; a steered quantization steers its codes on M_qq
as `steer` steers on M, then re-fits its grid to the codes by least squares; a whitened low-rank
layer takes the whitened truncation of T under M_qq + lam I, which minimises the objective above
exactly over all weights of its rank). This is the idea of GPTQ's and AdaRound's layer-by-layer
fitting on the quantized model's inputs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from allot.data import Data, token_mask
from allot.discover import LayerSpec, fold_weight_2d, get_weight
from allot.plan import LayerPlan, Plan
from allot.profile.activations import layer_rows
from allot.progress import progress_bar
from allot.schemes.steer import DAMPING
from allot.stats import LayerStats


def refined_layers(plan: Plan) -> list[str]:
    """The plan's layers error feedback re-fits: those whose scheme can be re-fitted."""
    return [layer.name for layer in plan.layers if layer.scheme.refits]


@torch.no_grad()
def feedback(
    reference: nn.Module, model: nn.Module, plan: Plan, data: Data, progress: bool = True
) -> nn.Module:
    """Re-fit `model`'s re-fittable layers (the plan applied to `reference`, the float
    BatchNorm-folded model) in order on the calibration batches, in place; returns `model`."""
    planned = {layer.name: layer for layer in plan.layers}
    for name in progress_bar(refined_layers(plan), "error feedback", progress):
        refit_layer(reference, model, planned[name], data)
    return model.eval()


@torch.no_grad()
def refit_layer(
    reference: nn.Module, model: nn.Module, layer: LayerPlan, data: Data
) -> tuple[Tensor, LayerStats]:
    """Feedback's target T (folded, float64) of one layer and the layer's input statistics in
    `model` (M_qq with its row count); the layer is re-fitted to T in place when its scheme
    re-fits (`Scheme.refits`), and left as it is otherwise."""
    quantized, cross = paired_moments(reference, model, layer.name, layer.spec, data)
    weight, bias = get_weight(reference, layer.name)
    target = feedback_target(fold_weight_2d(weight).double(), quantized, cross)
    if layer.scheme.refits:
        model.set_submodule(
            layer.name,
            layer.scheme.refit(
                target.to(weight.dtype).reshape(weight.shape), bias, layer.spec, quantized
            ),
        )
    return target, quantized


class _Captured(Exception):
    """Raised by a capturing hook to end a forward pass early."""


def paired_moments(
    reference: nn.Module, model: nn.Module, name: str, spec: LayerSpec, data: Data
) -> tuple[LayerStats, Tensor]:
    """Layer `name`'s input second moment in `model` (sum x_q x_q', float64, with its row count)
    and the cross moment with the same rows in `reference` (sum x_f x_q'). Each forward pass
    stops once the layer's input is captured: nothing after it is needed."""
    captured: dict[str, Tensor] = {}
    mask: list[Tensor | None] = [None]

    def capture(key: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[key] = layer_rows(args[0], spec, mask[0]).double()
            raise _Captured

        return hook

    handles = [
        reference.get_submodule(name).register_forward_pre_hook(capture("float")),
        model.get_submodule(name).register_forward_pre_hook(capture("quantized")),
    ]
    second, cross, rows = None, None, 0
    try:
        for batch in data.batches():
            mask[0] = token_mask(data.inputs(batch))
            for network in (reference, model):
                with contextlib.suppress(_Captured):
                    data.outputs(network.eval(), batch)
            x_q, x_f = captured["quantized"], captured["float"]
            second = x_q.T @ x_q if second is None else second + x_q.T @ x_q
            cross = x_f.T @ x_q if cross is None else cross + x_f.T @ x_q
            rows += x_q.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    assert second is not None and cross is not None
    return LayerStats(second, rows), cross


def feedback_target(weight_2d: Tensor, quantized: LayerStats, cross: Tensor) -> Tensor:
    """T = (W M_fq + lam W)(M_qq + lam I)^-1 for a folded float64 weight (out x fan_in), with
    M_qq and M_fq summed over `quantized.samples` rows and lam = DAMPING * mean diag(M_qq)."""
    assert quantized.input_cov is not None
    second = quantized.input_cov
    lam = DAMPING * float(second.diagonal().mean())
    eye = torch.eye(second.shape[0], dtype=second.dtype, device=second.device)
    right = weight_2d @ cross + lam * weight_2d
    return torch.linalg.solve(second + lam * eye, right.T).T
