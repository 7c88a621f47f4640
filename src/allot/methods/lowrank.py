"""Low-rank methods: lossless and compact joint factorization, and the factorization baselines
they are measured against (shared/papers/lowrank_lossless.md, baselines.md; docs/lowrank.md).

A layer is only factorized where that stores less: rank r of an (out x fan_in) weight stores
r (out + fan_in) numbers, so the grids offer the ranks 1..r0 with r0 (out + fan_in) < out fan_in
(the break-even rank `break_even`), thinned evenly to at most a fixed count per layer, and `Keep`.

- `lowrank-lossless`: whitened SVD at every grid rank, ranks per layer by the exact knapsack on
  each candidate's measured loss change (its layer alone cut; the second-order damage of one HVP
  per candidate, as CET, underestimates large cuts of confident classifiers: docs/lowrank.md),
  then the joint step (`allot.refine.joint`: error feedback and the loss-aware factor update).
- `lowrank-compact`: the same candidates, searched by greedy rank cuts accepted while the measured
  calibration loss stays at or below the float model's, alternating with the joint step
  (`allot.search`, `compact`); it runs under a lossless budget unless given another.
- `svd-energy`: plain SVD at every grid rank, one threshold on the share of each layer's weight
  energy discarded (min-max on the relative weight error: SVD-Energy).
- `svd-llm`: whitened SVD at the same fraction of full rank in every layer (SVD-LLM's uniform
  truncation).
- `uniform-rank` (in `baselines`): plain SVD at the same fraction of full rank everywhere.
"""

from __future__ import annotations

from allot.budget import Budget
from allot.discover import Layer, LayerSpec
from allot.methods.base import Method, register_method
from allot.methods.baselines import RANK_FRACTIONS, smaller_or_keep
from allot.schemes import Keep, LowRank, Scheme

WHITENED_RANKS = 32
"""Most whitened ranks per layer on the lossless and compact grids (each costs one pass over the
calibration data to measure)."""
ENERGY_RANKS = 64
"""Most ranks per layer on the SVD-Energy grid (all of them on the benchmark CNNs)."""


def break_even(spec: LayerSpec) -> int:
    """The largest rank r whose factors store fewer numbers than the weight: r (out + fan_in) <
    out fan_in (0 when no rank does)."""
    return (spec.numel - 1) // (spec.out_features + spec.fan_in)


def factorizing_ranks(spec: LayerSpec, count: int) -> list[int]:
    """The ranks 1..break_even(spec), or `count` of them evenly spread over that range (always
    including the largest), ascending."""
    top = break_even(spec)
    if top <= count:
        return list(range(1, top + 1))
    return sorted({max(1, round(top * k / count)) for k in range(1, count + 1)})


def whitened_grid(layer: Layer) -> list[Scheme]:
    """Whitened SVD at up to `WHITENED_RANKS` factorizing ranks, then float."""
    ranks = factorizing_ranks(layer.spec, WHITENED_RANKS)
    return [*(LowRank(r, "whitened") for r in ranks), Keep()]


def energy_grid(layer: Layer) -> list[Scheme]:
    """Plain SVD at up to `ENERGY_RANKS` factorizing ranks, then float."""
    return [*(LowRank(r) for r in factorizing_ranks(layer.spec, ENERGY_RANKS)), Keep()]


def uniform_whitened_grid(layer: Layer) -> list[Scheme]:
    """Whitened SVD at each fraction of full rank of `RANK_FRACTIONS` (float where that rank
    would not store less), then float: one setting per grid index in every layer."""
    spec = layer.spec
    full = min(spec.out_features, spec.fan_in)
    ranks = [max(1, round(f * full)) for f in RANK_FRACTIONS]
    return [*(smaller_or_keep(LowRank(r, "whitened"), spec) for r in ranks), Keep()]


for method in (
    Method(
        "lowrank-lossless",
        "whitened SVD, ranks by exact knapsack on each candidate's measured loss change, then "
        "the joint step",
        whitened_grid,
        error_model="measured",
        refine="lowrank-joint",
    ),
    Method(
        "lowrank-compact",
        "whitened SVD, greedy rank cuts kept while the measured calibration loss stays at or "
        "below float's (lossless budget by default)",
        whitened_grid,
        error_model="measured",
        refine="lowrank-joint",
        search="compact",
        budget=Budget("lossless"),
    ),
    Method(
        "svd-energy",
        "plain SVD keeping the same share of weight energy in every layer (SVD-Energy)",
        energy_grid,
        error_model="weight-relative",
        allocator="minmax",
    ),
    Method(
        "svd-llm",
        "whitened SVD at the same fraction of full rank in every layer (SVD-LLM)",
        uniform_whitened_grid,
        error_model="output",
        allocator="uniform",
    ),
):
    register_method(method)
