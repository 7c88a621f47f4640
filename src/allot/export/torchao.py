"""torchao export: the state dict of the model as trained, its quantized weights as torchao tensors.

Every quantized Linear or Conv2d weight on an integer grid becomes a torchao
`IntxUnpackedToInt8Tensor` (what `quantize_(model, IntxWeightOnlyConfig(...))` makes): int8 codes
q - 2**(bits-1) with `target_dtype` torch.int<bits>, float32 scales (the stored float16 values),
int8 zero points z - 2**(bits-1) (zero-point grids) or 0 (symmetric), `block_size` (1, group) for a
Linear layer and (1, group / kernel area, *kernel) for a Conv2d (per channel: the whole fan-in).
torchao dequantizes (q - z) * scale, exactly allot's weight; the export checks it layer by layer.

The state dict has the names of the float architecture the model was compressed from (not of the
artifact's folded structure): a BatchNorm that allot folded into its convolution is written as an
identity (mean 0, variance 1 - eps, weight 1) carrying the folded bias where the convolution has
none. Load it with `model.load_state_dict(torch.load(path, weights_only=True), assign=True)`.
What does not map (float-offset grids, 1-bit scaled signs, Conv1d, low-rank, sparse and summed
layers) raises `ExportError` naming the layer.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from allot.exceptions import ExportError
from allot.files import atomic_write
from allot.modules.base import FLOAT_LAYERS, CompressedLayer
from allot.modules.quant import FLOAT_OFFSET, QuantizedLayer
from allot.plan import Plan


def export_torchao(
    model: nn.Module, plan: Plan, architecture: Callable[[], nn.Module], path: Path
) -> Path:
    """Write the torchao state dict of `model` (an artifact as loaded, with its `plan`) for the
    float `architecture` (a factory) to `path` with `torch.save`."""
    state = torchao_state_dict(model, plan, architecture())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())
    return path


def torchao_state_dict(model: nn.Module, plan: Plan, original: nn.Module) -> dict[str, Tensor]:
    """The state dict of the float `original` architecture holding `model`'s compressed weights
    (torchao tensors for the quantized ones); `ExportError` naming the first layer that does not
    map."""
    weights = {layer.name: _weight(model.get_submodule(layer.name), layer) for layer in plan.layers}
    folded = dict(plan.folded)
    folded_into = {bn: conv for conv, bn in plan.folded}
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    for key, value in original.state_dict().items():
        owner, _, field = key.rpartition(".")
        if owner in weights and field == "weight":
            state[key] = weights[owner]
        elif owner in folded and field == "bias":
            state[key] = own[key]  # the convolution had a bias: it carries the folded one
        elif owner in folded_into:
            state[key] = _identity(key, field, value, own, folded_into[owner], original)
        elif key in own:
            state[key] = own[key]
        else:
            raise ExportError(
                f"{key} of the architecture is not in the artifact; is it the architecture the "
                "artifact was compressed from?"
            )
    return state


def _identity(
    key: str, field: str, value: Tensor, own: dict[str, Tensor], conv: str, original: nn.Module
) -> Tensor:
    """A folded BatchNorm's entry as an identity in eval mode, with the folded bias when its
    convolution has none."""
    bn = original.get_submodule(key.rpartition(".")[0])
    if field == "running_mean":
        return torch.zeros_like(value)
    if field == "running_var":
        return torch.full_like(value, 1.0 - bn.eps)
    if field == "weight":
        return torch.ones_like(value)
    if field == "bias":
        has_bias = original.get_submodule(conv).bias is not None
        return torch.zeros_like(value) if has_bias else own[f"{conv}.bias"].clone()
    return value.clone()  # num_batches_tracked


def _weight(module: nn.Module, layer) -> Tensor:
    """The layer's weight for torchao: its float weight, or a torchao tensor of its codes."""
    if isinstance(module, FLOAT_LAYERS):
        return module.weight.detach().clone()
    label = layer.scheme.label()
    if not isinstance(module, QuantizedLayer):
        kind = type(module).__name__ if isinstance(module, CompressedLayer) else "this layer"
        raise ExportError(
            f"layer {layer.name}: {label} ({kind}) has no torchao form (torchao holds quantized "
            "weights); export it with --format onnx"
        )
    spec = module.spec
    if spec.kind == "conv1d":
        raise ExportError(
            f"layer {layer.name}: {label} is a Conv1d, which torchao's intx "
            "weight tensor does not run; export it with --format onnx"
        )
    if module.bits == 1 or module.grid == FLOAT_OFFSET:
        why = "a 1-bit scaled sign" if module.bits == 1 else "a float-offset grid"
        raise ExportError(
            f"layer {layer.name}: {label} is {why}, which has no integer zero point for torchao; "
            "compress with a zero-point or symmetric grid, or export with --format onnx"
        )
    return _intx_tensor(module, layer.name, label)


def _intx_tensor(module: QuantizedLayer, name: str, label: str) -> Tensor:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    spec = module.spec
    grid = module.quant_grid()
    middle = 2 ** (module.bits - 1)
    out, groups = grid.scale.shape
    size = spec.fan_in // groups
    area = spec.fan_in // spec.in_features  # kernel positions (1 for Linear)
    if size % area:
        raise ExportError(
            f"layer {name}: {label} groups {size} inputs, not whole kernel windows of {area}; "
            "torchao's blocks cannot hold it"
        )
    block = (1, size) if spec.kind == "linear" else (1, size // area, *spec.kernel_size)
    tables = (out, groups) + (1,) * (len(spec.weight_shape) - 2)
    codes = (module.unpacked_codes() - middle).to(torch.int8).reshape(spec.weight_shape)
    zero = grid.zero_points() - middle
    tensor = IntxUnpackedToInt8Tensor(
        codes,
        grid.scale.to(torch.float32).reshape(tables),
        zero.to(torch.int8).reshape(tables),
        getattr(torch, f"int{module.bits}"),
        block,
        torch.float32,
        None,
    )
    if not torch.equal(tensor.dequantize(), module.reconstruct()):
        raise ExportError(f"layer {name}: torchao's dequantized {label} differs from allot's")
    return tensor
