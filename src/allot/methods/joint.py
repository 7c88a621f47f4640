"""Joint allocation: one budget across every compression family (issue 23, docs/joint.md).

`joint` offers every layer candidates from each family below, scores them all with one error
model and lets the exact multiple-choice knapsack (`allocate.knapsack`, which drops each layer's
dominated candidates before it solves) choose one per layer under the budget, so a layer may be
quantized, factorized, pruned or take a sum of two of these, whichever the budget favours.

The families (`FAMILIES`, named by `Scheme.kinds`), each built from the grid of the method that
owns it, with only candidates that store less than the float layer:
- `quant`: steered quantization at every CET bit-width and grouping (`cet.steered_quants`: 7
  per layer, 14 where a group of 128 divides a larger fan-in);
- `rank`: the whitened truncated SVD (`LowRank(r, "whitened")`) at the ranks 1..break-even of
  `lowrank.break_even`, thinned to `PER_FAMILY`;
- `qrank`: the same with its factors quantized to `FACTOR_BITS` bits
  (`LowRank(r, "whitened", FACTOR_BITS)`: about 8 times the rank at the float factors' size) at
  every rank that stores less than the float layer, thinned to `PER_FAMILY`;
- `grouped`: ALDS's grouped SVD, every (groups, rank) of `alds.grouped_grid`, thinned to
  `PER_FAMILY`;
- `sparse`: the largest magnitudes at the densities of `baselines.DENSITIES` (1%..100%),
  thinned to `PER_FAMILY`;
- the sums (`Sum`): `quant+sparse` (steered per-channel `SUM_BITS` bits + `SUM_DENSITIES`),
  `rank+sparse` (whitened `SUM_RANKS` + `SUM_DENSITIES`), `quant+rank` (`SUM_BITS` +
  `SUM_RANKS`): 4 each, the low-storage corner of each pair, where a sum can beat its parts.
Then `Keep`. At most 14 + 4 x 8 + 3 x 4 + 1 = 59 candidates per layer (each one fit and one
measured pass over the calibration data). Thinning keeps the candidates nearest to `PER_FAMILY`
storage levels spaced evenly on a log scale from the family's cheapest to its dearest
(`spread`): budgets span ratios geometrically (8x to 32x), so an even spread in bits would leave
the cheap end, where high ratios are decided, with one or two candidates.

Damage is the measured calibration-loss change of each candidate, its layer alone changed
(`measured`): the second-order damage g.d + 1/2 d'Hd underestimates large cuts, and the ratios
joint is for cut every layer hard (docs/joint.md has the measurement). `joint_grid(families)`
builds the grid for any subset of the families, so one family alone is the same candidates
scored the same way.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from allot.discover import Layer, LayerSpec
from allot.exceptions import ConfigError
from allot.methods.alds import grouped_grid
from allot.methods.base import Method, register_method
from allot.methods.baselines import DENSITIES
from allot.methods.cet import steered_quants
from allot.methods.lowrank import break_even
from allot.schemes import Grid, Keep, LowRank, Quant, Scheme, Sparse, Sum

FAMILIES = (
    "quant",
    "rank",
    "qrank",
    "grouped",
    "sparse",
    "quant+sparse",
    "rank+sparse",
    "quant+rank",
)
PER_FAMILY = 8
"""Most candidates per layer of the thinned families (rank, qrank, grouped, sparse)."""
FACTOR_BITS = 4
"""Bits of each quantized low-rank factor (`qrank`)."""
SUM_BITS = (1, 2)
"""Bits of the steered per-channel quantized part of a sum."""
SUM_DENSITIES = (0.01, 0.03)
"""Densities of the sparse part of a sum."""
SUM_RANKS = (1, 2)
"""Ranks of the whitened low-rank part of a sum."""
SUM_REPEATS = 3
"""Alternating rounds of a sum's fit (`Sum.repeats`, 10 by default): on mnist1d-cnn the sums of
this grid reach the measured loss change of 10 rounds after 2 or 3 (7 of 9 layer-sums tried
exactly, the others within 1%) at a third of the fitting time (docs/joint.md)."""


def spread(schemes: list[Scheme], spec: LayerSpec, count: int) -> list[Scheme]:
    """At most `count` of `schemes`, in their order: for each of `count` storage levels spaced
    evenly in log(bits) from the cheapest to the dearest, the scheme whose storage is nearest
    (in log bits; the first of equals), each taken once."""
    if len(schemes) <= count:
        return list(schemes)
    logs = np.log([float(s.storage_bits(spec)) for s in schemes])
    levels = np.linspace(logs.min(), logs.max(), count)
    picked = sorted({int(np.argmin(np.abs(logs - level))) for level in levels})
    return [schemes[i] for i in picked]


def _quant(layer: Layer) -> list[Scheme]:
    return list(steered_quants(layer.spec))


def _rank(layer: Layer) -> list[Scheme]:
    return [LowRank(r, "whitened") for r in range(1, break_even(layer.spec) + 1)]


def _qrank(layer: Layer) -> list[Scheme]:
    full = min(layer.spec.out_features, layer.spec.fan_in)
    return [LowRank(r, "whitened", FACTOR_BITS) for r in range(1, full + 1)]


def _grouped(layer: Layer) -> list[Scheme]:
    return [s for s in grouped_grid(layer) if s != Keep()]


def _sparse(layer: Layer) -> list[Scheme]:
    return [Sparse(d) for d in DENSITIES]


def _sum_ranks(spec: LayerSpec) -> list[LowRank]:
    return [LowRank(r, "whitened") for r in SUM_RANKS if r <= break_even(spec)]


def _quant_sparse(layer: Layer) -> list[Scheme]:
    return [
        Sum((Quant(b, rounding="steered"), Sparse(d)), SUM_REPEATS)
        for b in SUM_BITS
        for d in SUM_DENSITIES
    ]


def _rank_sparse(layer: Layer) -> list[Scheme]:
    return [Sum((r, Sparse(d)), SUM_REPEATS) for r in _sum_ranks(layer.spec) for d in SUM_DENSITIES]


def _quant_rank(layer: Layer) -> list[Scheme]:
    return [
        Sum((Quant(b, rounding="steered"), r), SUM_REPEATS)
        for b in SUM_BITS
        for r in _sum_ranks(layer.spec)
    ]


BUILDERS = {  # each family's full grid on a layer
    "quant": _quant,
    "rank": _rank,
    "qrank": _qrank,
    "grouped": _grouped,
    "sparse": _sparse,
    "quant+sparse": _quant_sparse,
    "rank+sparse": _rank_sparse,
    "quant+rank": _quant_rank,
}
THINNED = ("rank", "qrank", "grouped", "sparse")


def joint_grid(families: Collection[str] = FAMILIES) -> Grid:
    """The joint grid over `families` (names of `FAMILIES`): each family's candidates that store
    less than the float layer (those of `THINNED` families then `spread` to `PER_FAMILY`), in the
    order of `FAMILIES`, then `Keep`. `ConfigError` for an unknown family or none."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ConfigError(
            f"joint families must be a non-empty subset of {', '.join(FAMILIES)}; got "
            f"{', '.join(sorted(families)) or 'none'}"
        )
    chosen = [name for name in FAMILIES if name in families]

    def grid(layer: Layer) -> list[Scheme]:
        spec = layer.spec
        dense = Keep().storage_bits(spec)
        schemes: list[Scheme] = []
        for name in chosen:
            family = [s for s in BUILDERS[name](layer) if s.storage_bits(spec) < dense]
            schemes += spread(family, spec, PER_FAMILY) if name in THINNED else family
        return [*schemes, Keep()]

    return grid


JOINT = register_method(
    Method(
        "joint",
        "every family per layer (quantized, low-rank with float or quantized factors, grouped, "
        "sparse and their sums), one "
        "exact knapsack on the measured loss change of each candidate",
        joint_grid(),
        error_model="measured",
    )
)
