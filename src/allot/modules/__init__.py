"""Compressed modules that really store less, and the bit packing they use."""

from allot.modules.base import (
    CompressedLayer,
    build_float_layer,
    check_layer_tensors,
    dense_weight,
    layer_storage_bits,
)
from allot.modules.codebook import CodebookLayer
from allot.modules.combo import SumLayer
from allot.modules.grouped import GroupedLayer, QuantizedGroupedLayer
from allot.modules.lowrank import Bottleneck, LowRankLayer, QuantizedLowRankLayer
from allot.modules.packing import pack, packed_nbytes, unpack
from allot.modules.quant import QuantizedLayer
from allot.modules.sparse import SparseLayer
from allot.modules.ternary import TernaryLayer

__all__ = [
    "Bottleneck",
    "CodebookLayer",
    "CompressedLayer",
    "GroupedLayer",
    "LowRankLayer",
    "QuantizedGroupedLayer",
    "QuantizedLayer",
    "QuantizedLowRankLayer",
    "SparseLayer",
    "SumLayer",
    "TernaryLayer",
    "build_float_layer",
    "check_layer_tensors",
    "dense_weight",
    "layer_storage_bits",
    "pack",
    "packed_nbytes",
    "unpack",
]
