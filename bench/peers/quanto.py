"""optimum-quanto: `quantize(model, weights=qintN)` then `freeze(model)`, weights only (no
activation quantization), data-free.

quanto's defaults: qint8 is symmetric per output channel (`AbsmaxOptimizer`: scale = max|w| / 127,
int8 codes). qint4 and qint2 are affine (`MaxOptimizer`: scale = (max - min) / (2^N - 1),
shift = -min, codes 0..2^N-1, dequantized as code * scale - shift) in groups along the input of
128 weights, or the largest of 96, 64, 32 that divides the layer's input width, or per output
channel when none does or the input width is at most 128. Scales and shifts are in the weight's
dtype.

Stored bits are quanto's real tensors after `freeze`: the codes (uint8 bit-packed, two 4-bit or
four 2-bit codes per byte along the rows, rows padded to whole bytes; or int8), plus `_scale` and,
for qint4/qint2, `_shift`. The frozen `QLinear` runs quanto's own forward.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from allot.discover import Layer
from allot.zoo.data import Dataset
from peers.base import Peer, PeerRun, Setting, linear_layers, option, tensor_bits

WEIGHTS = ("qint8", "qint4", "qint2")


def quanto_stored_bits(weight: Tensor) -> int:
    """Bits of a frozen quanto weight (`WeightQBytesTensor` or `WeightQBitsTensor`): its codes as
    stored (the uint8 words of a `PackedTensor`, or the int8 codes), plus its scale and, where it
    has one, its shift, at their dtypes."""
    from optimum.quanto.tensor.packed import PackedTensor

    codes = weight._data._data if isinstance(weight._data, PackedTensor) else weight._data
    tables = [weight._scale, getattr(weight, "_shift", None)]
    return tensor_bits(codes) + sum(tensor_bits(table) for table in tables if table is not None)


def settings() -> list[Setting]:
    """qint8, qint4 and qint2 weights."""
    return [Setting(weights, {"weights": weights}) for weights in WEIGHTS]


def run(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """Quantize a copy of `model`'s Linear layers with quanto and freeze them (data-free: `dataset`
    is not used). Option: `weights` (one of `WEIGHTS`)."""
    from optimum.quanto import freeze, quantize

    weights = str(option(setting, "weights", WEIGHTS))
    quantized_model = copy.deepcopy(model)
    names, notes = linear_layers(quantized_model, layers)
    quantize(quantized_model, weights=weights, activations=None, include=names)
    freeze(quantized_model)
    modules = {name: quantized_model.get_submodule(name) for name in names}
    stored = {name: quanto_stored_bits(module.weight) for name, module in modules.items()}
    if weights == "qint8":
        grid = "quanto qint8 symmetric per output channel: max-abs scale, round to nearest"
    else:
        groups = sorted(
            {str(module.weight_group_size or "per-channel") for module in modules.values()}
        )
        grid = (
            f"quanto {weights} affine, groups along the input ({', '.join(groups)}): min-max scale "
            "and float shift, round to nearest"
        )
    return PeerRun(quantized_model, stored, f"{grid}; scales in the weight dtype", notes)


PEERS: tuple[Peer, ...] = (
    Peer(
        name="optimum-quanto",
        distribution="optimum-quanto",
        targets="linear",
        settings=settings,
        run=run,
        modules=("optimum.quanto",),
    ),
)
