"""HQQ (mobiusml/hqq): half-quadratic quantization of Linear weights, data-free.

Each selected Linear becomes an `hqq.core.quantize.HQQLinear` built from HQQ's recommended
`BaseQuantizeConfig(nbits, group_size)`: groups of `group_size` consecutive weights along the input
(axis=1), asymmetric codes 0..2^nbits-1, a min-max scale and a zero point refined by HQQ's
half-quadratic solver (zero rounded to an integer at 4 bits), both held in float16 (HQQ's default
compute dtype) and not themselves quantized (HQQ 0.2.8 ignores `quant_scale`/`quant_zero`). The
layer runs HQQ's own pure-PyTorch forward (dequantize, float16 matmul); `CastLinear`
feeds it float16 and hands back the model's dtype, so the rest of the model stays float32.

Stored bits are HQQ's real tensors: the packed `W_q` (two 4-bit or four 2-bit codes per uint8,
ten 3-bit codes per int32 with its two spare bits and row padding) plus every tensor of its `meta`
(scale and zero).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from allot.discover import Layer
from allot.exceptions import ConfigError
from allot.zoo.data import Dataset
from peers.base import Peer, PeerRun, Setting, linear_layers, option, tensor_bits

BITS = (4, 3, 2)
GROUP_SIZES = (64, 128)
# Bit-widths HQQ bit-packs (5 and 6 bits it keeps one per uint8; 1.58 is ternary).
PACKED_BITS = (8, 4, 3, 2, 1)
COMPUTE_DTYPE = torch.float16


class CastLinear(nn.Module):
    """Runs a quantized linear module that computes in `dtype` (HQQ's `HQQLinear`) inside a model
    of another dtype: casts the input to `dtype` and the output back to the input's dtype."""

    def __init__(self, quantized: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.quantized = quantized
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.quantized(x.to(self.dtype)).to(x.dtype)


def hqq_stored_bits(quantized: nn.Module) -> int:
    """Bits an `HQQLinear` holds for its weight: the packed codes `W_q` plus every tensor of
    `meta` (scale, zero; quantized scale/zero tables where HQQ keeps them), each at its dtype."""
    meta_tensors = [value for value in quantized.meta.values() if isinstance(value, Tensor)]
    return tensor_bits(quantized.W_q) + sum(tensor_bits(tensor) for tensor in meta_tensors)


def settings() -> list[Setting]:
    """HQQ at 4, 3 and 2 bits, groups of 64 and 128 weights."""
    return [
        Setting(f"{bits}-bit g{group}", {"bits": bits, "group_size": group})
        for bits in BITS
        for group in GROUP_SIZES
    ]


def run(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """Quantize a copy of `model`'s Linear layers with HQQ (data-free: `dataset` is not used).

    Options: `bits` (one of `PACKED_BITS`), `group_size` (a positive multiple of 8, as
    `BaseQuantizeConfig` requires). Layers whose input width is not a multiple of the group stay
    in float, with a note."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    bits = int(option(setting, "bits", PACKED_BITS))
    group_size = setting.options.get("group_size")
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise ConfigError(
            f"setting {setting.label!r}: HQQ group_size must be a positive multiple of 8, "
            f"got {group_size!r}"
        )
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    quantized_model = copy.deepcopy(model)
    names, notes = linear_layers(quantized_model, layers, group_size)
    stored: dict[str, int] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        linear = quantized_model.get_submodule(name)
        quantized = HQQLinear(linear, config, compute_dtype=COMPUTE_DTYPE, device="cpu")
        stored[name] = hqq_stored_bits(quantized)
        setattr(
            quantized_model.get_submodule(parent_name), child, CastLinear(quantized, COMPUTE_DTYPE)
        )
    if bits == 3:
        notes.append(
            "3-bit codes are packed 10 per int32 (3.2 bits each; groups padded to a multiple of 10)"
        )
    zero = "integer-rounded zero" if config["weight_quant_params"]["round_zero"] else "float zero"
    dtype = str(COMPUTE_DTYPE).removeprefix("torch.")
    grid = (
        f"HQQ {bits}-bit asymmetric, group {group_size} along the input (axis=1): min-max scale, "
        f"{zero} refined by half-quadratic optimisation; {dtype} scale and zero, not quantized; "
        f"{dtype} compute"
    )
    return PeerRun(quantized_model, stored, grid, notes)


PEERS: tuple[Peer, ...] = (
    Peer(
        name="hqq",
        distribution="hqq",
        targets="linear",
        settings=settings,
        run=run,
        modules=("hqq.core.quantize",),
    ),
)
