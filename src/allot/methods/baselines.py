"""Baseline methods a practitioner would compare against (shared/papers/baselines.md).

Uniform methods give every layer the same setting (grid index) and pick the most accurate setting
that fits the budget; the knapsack baselines choose bits per layer by an exact multiple-choice
knapsack on a simple error model. Every grid ends with `Keep` so that "no compression" is reachable.
"""

from __future__ import annotations

from allot.discover import Layer, LayerSpec
from allot.methods.base import Method, register_method
from allot.schemes import Keep, LowRank, Quant, Scheme, Sparse

QUANT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
RANK_FRACTIONS = tuple(k / 64 for k in range(1, 65))
DENSITIES = tuple(k / 100 for k in range(1, 101))


def quant_grid(layer: Layer) -> list[Scheme]:
    """Per-output-channel round-to-nearest at every bit-width, then float."""
    return [*(Quant(bits) for bits in QUANT_BITS), Keep()]


def smaller_or_keep(scheme: Scheme, spec: LayerSpec) -> Scheme:
    """A scheme only replaces a layer when it really stores less than float."""
    return scheme if scheme.storage_bits(spec) < Keep().storage_bits(spec) else Keep()


def rank_grid(layer: Layer) -> list[Scheme]:
    """The same fraction of full rank in every layer: rank = max(1, round(f * min(out, fan_in)))."""
    spec = layer.spec
    full = min(spec.out_features, spec.fan_in)
    ranks = [max(1, round(f * full)) for f in RANK_FRACTIONS]
    return [*(smaller_or_keep(LowRank(r), spec) for r in ranks), Keep()]


def density_grid(layer: Layer) -> list[Scheme]:
    """The same fraction of weights kept (largest magnitudes) in every layer."""
    return [*(smaller_or_keep(Sparse(d), layer.spec) for d in DENSITIES), Keep()]


register_method(
    Method(
        "uniform-quant",
        "same bit-width in every layer (per-channel round-to-nearest)",
        quant_grid,
        error_model="output",
        allocator="uniform",
    )
)
register_method(
    Method(
        "uniform-rank",
        "same rank ratio in every layer (truncated SVD)",
        rank_grid,
        error_model="output",
        allocator="uniform",
    )
)
register_method(
    Method(
        "magnitude-prune",
        "same density in every layer, largest magnitudes kept",
        density_grid,
        error_model="output",
        allocator="uniform",
    )
)
register_method(
    Method(
        "weight-error-quant",
        "bits per layer by exact knapsack on squared weight error",
        quant_grid,
        error_model="weight",
        allocator="knapsack",
    )
)
register_method(
    Method(
        "output-error-quant",
        "bits per layer by exact knapsack on squared output error on calibration data",
        quant_grid,
        error_model="output",
        allocator="knapsack",
    )
)
