"""ALDS (Liebenwein et al. 2021, shared/papers/alds.md) and allot's variants of it.

Every method here offers each layer the same grouped candidates (`grouped_grid`): k input-channel
groups for every divisor k of the channel count, each group at every rank j whose decomposition
stores less than the float layer, then float. They differ in how a plan is chosen:
- `alds`: the paper's recipe: the relative operator-norm error |W_hat - W|_2 / |W|_2 of each
  candidate (measured; the paper allocates on its bound, see docs/alds.md), the paper's search
  (`allocate.alds`: global threshold alternating with the local choice of k, 15 seeds x 4
  iterations);
- `alds-minmax`: the same error, the exact least largest error (one threshold over every (k, j),
  `allocate.minmax`), which the paper's search approximates;
- `alds-knapsack`: the same candidates scored by allot's curvature damage 1/2 d'H_ii d (one exact
  Hessian-vector product per candidate) and chosen by the exact knapsack;
- `alds-knapsack-whitened`: as `alds-knapsack`, each candidate fitted to the layer's calibration
  inputs (`Grouped(k, j, "whitened")`) instead of by each group's plain SVD. The paper's fit is
  plain, so `alds` keeps it.
Each then fine-tunes the compressed model (`finetune`, `REFINE`): 2 epochs on the training
batches, Adam, the learning rate restarted at 2e-4 and decayed by a cosine to 0, our short form of
the paper's retraining with learning-rate rewinding (docs/alds.md says why this rate: one tenth of
ResNet-20's training rate; at its full rate the BatchNorm-folded network diverges).
`--refine-epochs 0` turns it off, and data without training batches needs that.
"""

from __future__ import annotations

from allot.discover import Layer
from allot.methods.base import Method, register_method
from allot.schemes import Grouped, Keep, Scheme
from allot.schemes.grouped import divisors

REFINE = {"epochs": 2, "lr": 2e-4}


def grouped_grid(layer: Layer, fit: str = "plain") -> list[Scheme]:
    """Grouped(k, j, `fit`) for every divisor k of the input channels and every rank j from 1 up
    to the group's full rank while the decomposition stores less than float, then Keep."""
    spec = layer.spec
    dense = Keep().storage_bits(spec)
    schemes: list[Scheme] = []
    for groups in divisors(spec.in_features):
        for rank in range(1, Grouped(groups, 1).full_rank(spec) + 1):
            scheme = Grouped(groups, rank, fit)
            if scheme.storage_bits(spec) >= dense:
                break
            schemes.append(scheme)
    return [*schemes, Keep()]


def whitened_grouped_grid(layer: Layer) -> list[Scheme]:
    """`grouped_grid` with every candidate fitted to the layer's calibration inputs."""
    return grouped_grid(layer, "whitened")


register_method(
    Method(
        "alds",
        "ALDS: grouped SVD per layer, min-max relative operator error by the paper's search",
        grouped_grid,
        error_model="operator-relative",
        allocator="alds",
        refine="finetune",
        refine_settings=dict(REFINE),
    )
)
register_method(
    Method(
        "alds-minmax",
        "grouped SVD per layer, exact min-max relative operator error over every (k, j)",
        grouped_grid,
        error_model="operator-relative",
        allocator="minmax",
        refine="finetune",
        refine_settings=dict(REFINE),
    )
)
register_method(
    Method(
        "alds-knapsack",
        "grouped SVD per layer, exact knapsack on the curvature damage 1/2 d'Hd",
        grouped_grid,
        error_model="curvature",
        allocator="knapsack",
        refine="finetune",
        refine_settings=dict(REFINE),
    )
)
register_method(
    Method(
        "alds-knapsack-whitened",
        "grouped SVD fitted to the calibration inputs, exact knapsack on the curvature damage",
        whitened_grouped_grid,
        error_model="curvature",
        allocator="knapsack",
        refine="finetune",
        refine_settings=dict(REFINE),
    )
)
