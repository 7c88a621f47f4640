"""Schemes: how one layer is compressed (see `allot.schemes.base`)."""

from allot.schemes.base import (
    SCHEMES,
    Grid,
    Scheme,
    parse_scheme,
    register_scheme,
    scheme_from_json,
)
from allot.schemes.combo import Sum
from allot.schemes.grouped import Grouped
from allot.schemes.keep import Keep
from allot.schemes.lowrank import LowRank
from allot.schemes.quant import Quant
from allot.schemes.sparse import Sparse

__all__ = [
    "SCHEMES",
    "Grid",
    "Grouped",
    "Keep",
    "LowRank",
    "Quant",
    "Scheme",
    "Sparse",
    "Sum",
    "parse_scheme",
    "register_scheme",
    "scheme_from_json",
]
