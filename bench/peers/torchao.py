"""torchao: `quantize_(model, IntxWeightOnlyConfig(...))`, integer weight-only quantization of
Linear layers, data-free.

torchao's defaults otherwise: `MappingType.SYMMETRIC` (scale = max|w| / ((qmax - qmin) / 2),
codes qmin..qmax = -2^(N-1)..2^(N-1)-1, round to nearest, so the largest positive weight clips to
qmax), scales in the weight's dtype (`scale_dtype=None`), an int8 zero point per group (0 for the
symmetric mappings), `IntxPackingFormat.UNPACKED_TO_INT8`, `IntxChooseQParamsAlgorithm.AFFINE`.
The `hqq_scale_only` settings choose each group's scale instead by torchao's HQQ-style iteration
(alternate rounding and a least-squares scale), still symmetric with zero points 0.

torchao keeps the N-bit codes one per int8 (`qdata`); they are counted bit-packed at N bits, plus
the `scale` and `zero_point` tensors at their dtypes. The weight becomes an
`IntxUnpackedToInt8Tensor` whose linear dequantizes and calls `F.linear`: torchao's own numerics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from allot.discover import Layer
from allot.exceptions import ConfigError
from allot.zoo.data import Dataset
from peers.base import (
    Peer,
    PeerRun,
    Setting,
    linear_layers,
    option,
    packed_bits,
    tensor_bits,
)

BITS = (4, 3, 2)
GROUP_SIZE = 64
HQQ_BITS = (4, 3)
ALGORITHMS = ("affine", "hqq_scale_only")


def intx_stored_bits(weight: torch.Tensor, bits: int) -> int:
    """Bits of an `IntxUnpackedToInt8Tensor` weight of target dtype int`bits`: its codes
    bit-packed at `bits` bits, plus its scale and zero point tensors at their dtypes."""
    return (
        packed_bits(weight.qdata.numel(), bits)
        + tensor_bits(weight.scale)
        + tensor_bits(weight.zero_point)
    )


def settings() -> list[Setting]:
    """int4/int3/int2 with groups of 64 and per output channel (affine defaults), then int4/int3
    groups of 64 with HQQ-chosen scales."""
    rows = [
        Setting(
            f"int{bits} {granularity}",
            {"bits": bits, "group_size": group, "algorithm": "affine"},
        )
        for bits in BITS
        for group, granularity in ((GROUP_SIZE, f"g{GROUP_SIZE}"), (None, "per-channel"))
    ]
    rows += [
        Setting(
            f"int{bits} g{GROUP_SIZE} hqq-scales",
            {"bits": bits, "group_size": GROUP_SIZE, "algorithm": "hqq_scale_only"},
        )
        for bits in HQQ_BITS
    ]
    return rows


def run(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """Quantize a copy of `model`'s Linear layers with torchao (data-free: `dataset` is not used).

    Options: `bits` (1..8), `group_size` (a positive int: groups of that many weights along the
    input; None: one scale per output channel), `algorithm` (`ALGORITHMS`). Layers whose input
    width is not a multiple of the group stay in float, with a note."""
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

    bits = int(option(setting, "bits", range(1, 9)))
    algorithm = str(option(setting, "algorithm", ALGORITHMS))
    group_size = setting.options.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ConfigError(
            f"setting {setting.label!r}: group_size must be a positive int or None "
            f"(per channel), got {group_size!r}"
        )
    config = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=PerAxis(0) if group_size is None else PerGroup(group_size),
        intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm(algorithm),
    )
    quantized_model = copy.deepcopy(model)
    names, notes = linear_layers(quantized_model, layers, group_size)
    targets = set(names)
    quantize_(quantized_model, config, filter_fn=lambda _, fqn: fqn in targets)
    stored = {
        name: intx_stored_bits(quantized_model.get_submodule(name).weight, bits) for name in names
    }
    scales = (
        "HQQ-style least-squares scale (hqq_scale_only)"
        if algorithm == "hqq_scale_only"
        else f"symmetric scale max|w| / {(2**bits - 1) / 2:g} (the largest weight may clip)"
    )
    granularity = "per output channel" if group_size is None else f"group {group_size}"
    grid = (
        f"torchao int{bits} {granularity}: {scales}, round to nearest, int8 zero point "
        f"(0), scale in the weight dtype; codes held in int8, counted at {bits} bits"
    )
    return PeerRun(quantized_model, stored, grid, notes)


PEERS: tuple[Peer, ...] = (
    Peer(
        name="torchao",
        distribution="torchao",
        targets="linear",
        settings=settings,
        run=run,
        modules=("torchao.quantization",),
    ),
)
