"""LC as a method (shared/papers/lc.md, docs/lc.md): CET's plan, then learning-compression.

`lc` chooses bits per layer as `cet` does (round-to-nearest at {1, 2, 3, 4, 5, 6, 8} bits or
float, exact knapsack on the curvature damage 1/2 d'Hd) and refines the applied plan with the
`lc` refiner: the float weights are trained towards the plan's compressed form, which is what the
model becomes. One scheme for every layer instead of the allocator's choice is a policy pin on
every layer (`Policy.parse(pins=["*=quant:1+sparse:0.02"])`, the CLI's `--scheme`); any other
method's plan is refined the same way with `Refinement("lc")` (`--refine lc`, `allot refine`).
"""

from __future__ import annotations

from allot.methods.base import Method, register_method
from allot.methods.cet import cet_grid

register_method(
    Method(
        "lc",
        "CET's bits per layer, then learning-compression trains the weights toward the plan",
        cet_grid,
        error_model="curvature",
        refine="lc",
    )
)
