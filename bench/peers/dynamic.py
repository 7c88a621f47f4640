"""torch's dynamic int8 quantization (`torch.ao.quantization.quantize_dynamic`) of every nn.Linear.

One setting, torch's default dynamic qconfig for `dtype=torch.qint8`: each Linear's weight becomes
int8 codes on one per-tensor grid (MinMaxObserver, symmetric: scale = largest |weight| / 127.5,
zero point 0, round to nearest), and its input is quantized to uint8 on the fly per call (7-bit
range on x86/fbgemm, `reduce_range=True`), so the model's metrics include activation quantization.

Stored bits are read from each quantized module's `weight()`, the int8 tensor its packed params
hold: its codes (one byte each) plus the per-tensor scale and zero point that quantized tensor
keeps (a C++ double and int64, as `state_dict` saves them). fbgemm's in-memory packing adds an
int32 column offset per output channel, derived from the codes, which is not counted.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from allot.discover import Layer
from allot.exceptions import ConfigError
from allot.zoo.data import Dataset
from peers.base import Peer, PeerRun, Setting, tensor_bits

# A per-tensor quantized tensor's quantizer (`PerTensorAffineQuantizer`) holds its scale as a double
# and its zero point as an int64; `q_scale()` and `q_zero_point()` return them as Python numbers.
QPARAM_BITS = torch.finfo(torch.float64).bits + torch.iinfo(torch.int64).bits

GRID = (
    "torch quantize_dynamic int8: one symmetric per-tensor grid per weight (scale = max |w| / "
    "127.5, zero point 0), round to nearest; inputs quantized to uint8 per call (reduce_range)"
)


def settings() -> list[Setting]:
    """The one setting: torch's default dynamic qconfig for qint8."""
    return [Setting("int8 per-tensor, dynamic activations")]


def qtensor_bits(weight: Tensor) -> int:
    """Bits of a per-tensor quantized weight as held: its codes at their dtype (`int_repr()`) plus
    its scale and zero point at the quantizer's dtypes. ValueError for other quantization schemes."""
    if weight.qscheme() != torch.per_tensor_affine:
        raise ValueError(f"expected a per-tensor affine quantized weight, got {weight.qscheme()}")
    return tensor_bits(weight.int_repr()) + QPARAM_BITS


def run(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """Quantize a copy of `model`'s nn.Linear layers with `quantize_dynamic` (qint8).

    `stored_bits[layer]` is `qtensor_bits` of the layer's quantized weight; allot layers that are
    not plain nn.Linear stay in float and are absent. The data set is not used (no calibration).
    """
    if setting.options:
        raise ConfigError(
            f"torch-dynamic-int8 setting {setting.label!r} takes no options, got "
            f"{sorted(setting.options)}"
        )
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 deprecates eager-mode quantization in favour of torchao; it still runs.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    stored_bits = {}
    notes = []
    for layer in layers:
        module = quantized.get_submodule(layer.name)
        if isinstance(module, DynamicLinear):
            stored_bits[layer.name] = qtensor_bits(module.weight())
        else:
            notes.append(f"{layer.name}: {type(module).__name__} is not nn.Linear; kept in float")
    return PeerRun(quantized, stored_bits, GRID, notes)


PEERS = (
    Peer(
        name="torch-dynamic-int8",
        distribution="torch",
        targets="linear",
        settings=settings,
        run=run,
        modules=("torch.ao.quantization",),
    ),
)
