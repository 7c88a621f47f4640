"""CET and the Hessian-aware baselines it is measured against (shared/papers/cet.md, baselines.md).

- `cet`: bit-widths {1, 2, 3, 4, 5, 6, 8} or float per layer, round-to-nearest with scales per
  output channel or (where 128 divides a larger fan-in) per group of 128 inputs,
  chosen by exact multiple-choice knapsack on the exact quadratic damage 1/2 d'H_ii d (one
  Hessian-vector product per candidate; the gradient term is left out, see
  `allot.errors` and docs/cet.md for the measurement behind that).
- `cet-steer`: the same, with every candidate's clipping and codes steered out of the
  high-curvature directions (`allot.schemes.steer`), so the knapsack sees the steered damages.
- `hawq-v2`: the same grid, knapsack on HAWQ-V2's Omega = tr(H_ii)/n_i |d|^2 (Hutchinson trace;
  ours is deflated by Lanczos, which makes the baseline's trace more accurate, not less).
- `hawq-v3`: HAWQ-V3's integer program over {4, 8} bits per layer on the same Omega.
- `uniform-steered`: the same bit-width in every layer, steered: steering alone against
  `uniform-quant` (round-to-nearest) at equal bits.
First and last layers get no special treatment: the allocator decides.
"""

from __future__ import annotations

from allot.discover import Layer, LayerSpec
from allot.methods.base import Method, register_method
from allot.schemes import Keep, Quant, Scheme

CET_BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP = 128


def _groupings(spec: LayerSpec) -> list[int | None]:
    """Scales per output channel, and per group of 128 inputs where 128 divides a larger fan-in
    (the allocator weighs the group's extra scales against what they save; outlier weights, as in
    MiniLM's FFN outputs, ruin a whole channel's grid otherwise)."""
    grouped = spec.fan_in > GROUP and spec.fan_in % GROUP == 0
    return [None, GROUP] if grouped else [None]


def cet_grid(layer: Layer) -> list[Scheme]:
    """Round-to-nearest at every CET bit-width and grouping, then float."""
    return [
        *(Quant(bits, group) for bits in CET_BITS for group in _groupings(layer.spec)),
        Keep(),
    ]


def steered_quants(spec: LayerSpec, bits: tuple[int, ...] = CET_BITS) -> list[Quant]:
    """Steered quantization at each of `bits` and every grouping CET offers the layer."""
    return [Quant(b, group, "steered") for b in bits for group in _groupings(spec)]


def steered_grid(layer: Layer) -> list[Scheme]:
    """Steered quantization at every CET bit-width and grouping, then float."""
    return [*steered_quants(layer.spec), Keep()]


def uniform_steered_grid(layer: Layer) -> list[Scheme]:
    """Per-channel steered quantization at every CET bit-width, then float (one setting per
    grid index in every layer, as the uniform allocator needs)."""
    return [*(Quant(bits, rounding="steered") for bits in CET_BITS), Keep()]


def hawq_v3_grid(layer: Layer) -> list[Scheme]:
    """4 or 8 bits per layer, as HAWQ-V3's integer program allows."""
    return [Quant(4), Quant(8)]


for method in (
    Method(
        "cet",
        "bits per layer by exact knapsack on the exact curvature damage 1/2 d'Hd (CET)",
        cet_grid,
        error_model="curvature",
    ),
    Method(
        "cet-steer",
        "CET with clipping and rounding steered out of high-curvature directions",
        steered_grid,
        error_model="curvature",
    ),
    Method(
        "cet-feedback",
        "cet-steer, then each steered layer re-fitted in order on the compressed model's inputs",
        steered_grid,
        error_model="curvature",
        refine="feedback",
    ),
    Method(
        "hawq-v2",
        "bits per layer by exact knapsack on HAWQ-V2's trace-weighted squared weight error",
        cet_grid,
        error_model="hawq",
    ),
    Method(
        "uniform-steered",
        "same bit-width in every layer, clipping and rounding steered",
        uniform_steered_grid,
        error_model="output",
        allocator="uniform",
    ),
    Method(
        "uniform-feedback",
        "uniform-steered, then each layer re-fitted in order on the compressed model's inputs",
        uniform_steered_grid,
        error_model="output",
        allocator="uniform",
        refine="feedback",
    ),
    Method(
        "hawq-v3",
        "4 or 8 bits per layer by integer program on HAWQ-V2's sensitivity (HAWQ-V3)",
        hawq_v3_grid,
        error_model="hawq",
    ),
):
    register_method(method)
