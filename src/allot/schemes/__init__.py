"""Schemes: how one layer is compressed (see `allot.schemes.base`)."""

from allot.schemes.base import (
    SCHEMES,
    Grid,
    Scheme,
    parse_scheme,
    register_scheme,
    scheme_from_json,
)
from allot.schemes.codebook import Codebook
from allot.schemes.combo import Sum
from allot.schemes.grouped import Grouped
from allot.schemes.keep import Keep
from allot.schemes.lowrank import LowRank
from allot.schemes.quant import Quant
from allot.schemes.sparse import Sparse
from allot.schemes.ternary import Ternary

__all__ = [
    "SCHEMES",
    "Codebook",
    "Grid",
    "Grouped",
    "Keep",
    "LowRank",
    "Quant",
    "Scheme",
    "Sparse",
    "Sum",
    "Ternary",
    "parse_scheme",
    "register_scheme",
    "scheme_from_json",
]
