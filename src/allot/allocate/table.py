"""The allocator's input: for every layer, the cost and the predicted damage of each option.

Option ``j`` of layer ``i`` is one candidate scheme for that layer. Its cost is in bits (storage)
unless the caller says otherwise; its damage is the error model's prediction and may be negative
(a candidate that lowers the loss). A *choice* is one option index per layer. Optionally each option names its structural *family*
(a positive integer, 0 for an option that belongs to every family): allocators that search over
structures per layer (ALDS: the number of input-channel groups) read it; the others ignore it.

Totals are summed with `math.fsum`, which rounds the exact sum once: the total of a choice does not
depend on the order of the layers, and every allocator checks budgets against these same totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from allot.exceptions import BudgetError, ConfigError, PlanError


def _as_vectors(name: str, values: Sequence[ArrayLike]) -> tuple[np.ndarray, ...]:
    """Per-layer read-only float64 copies; ConfigError unless each is 1-D, non-empty and finite."""
    vectors = []
    for i, value in enumerate(values):
        try:
            vector = np.array(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}[{i}] is not a list of numbers: {err}") from None
        if vector.ndim != 1:
            raise ConfigError(
                f"{name}[{i}] must be 1-D (one value per option), got {vector.ndim}-D"
            )
        if vector.size == 0:
            raise ConfigError(f"{name}[{i}] is empty: every layer needs at least one option")
        if not np.all(np.isfinite(vector)):
            raise ConfigError(f"{name}[{i}] has a value that is NaN or infinite: {vector.tolist()}")
        vector.flags.writeable = False
        vectors.append(vector)
    return tuple(vectors)


def _as_families(
    values: Sequence[ArrayLike], costs: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, ...]:
    """Per-layer read-only int64 family labels; ConfigError unless one whole number >= 0 per
    option of every layer."""
    if len(values) != len(costs):
        raise ConfigError(
            f"families has {len(values)} layers but costs has {len(costs)}; give both per layer"
        )
    labels = []
    for i, (value, cost) in enumerate(zip(values, costs, strict=True)):
        vector = np.asarray(value)
        if vector.shape != cost.shape or not np.issubdtype(vector.dtype, np.integer):
            raise ConfigError(f"families[{i}] must hold one whole number per option of layer {i}")
        if np.any(vector < 0):
            raise ConfigError(f"families[{i}] has a negative label: {vector.tolist()}")
        vector = vector.astype(np.int64)
        vector.flags.writeable = False
        labels.append(vector)
    return tuple(labels)


@dataclass(frozen=True, eq=False)
class Options:
    """Cost (bits unless said otherwise) and damage of every option of every layer.

    ``costs[i][j]`` and ``damages[i][j]`` describe option ``j`` of layer ``i``. Any sequence of
    array-likes is accepted; they are stored as tuples of read-only 1-D float64 arrays. Raises
    ConfigError unless there is at least one layer, every layer has at least one option, costs and
    damages have the same shape per layer, all values are finite and all costs are non-negative.
    ``families[i][j]``, when given, is option ``j``'s family (whole numbers >= 0, 0 meaning every
    family); without it every option is in one family. ``work[i][j]``, when given, is a second
    cost of option ``j`` that an allocation may also limit (multiply-accumulates per sample,
    say; `allocate.knapsack.minimize_damage`'s ``max_work``). Equality is identity: two tables with
    equal values are still two tables.
    """

    costs: tuple[np.ndarray, ...]
    damages: tuple[np.ndarray, ...]
    families: tuple[np.ndarray, ...] | None = None
    work: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        costs = _as_vectors("costs", self.costs)
        damages = _as_vectors("damages", self.damages)
        if not costs:
            raise ConfigError("options need at least one layer")
        if len(costs) != len(damages):
            raise ConfigError(
                f"costs has {len(costs)} layers but damages has {len(damages)}; give both per layer"
            )
        for i, (cost, damage) in enumerate(zip(costs, damages, strict=True)):
            if cost.size != damage.size:
                raise ConfigError(
                    f"layer {i} has {cost.size} costs but {damage.size} damages; "
                    "give one cost and one damage per option"
                )
            if np.any(cost < 0):
                raise ConfigError(f"layer {i} has a negative cost: {cost.tolist()}")
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "damages", damages)
        if self.families is not None:
            object.__setattr__(self, "families", _as_families(self.families, costs))
        if self.work is not None:
            work = _as_vectors("work", self.work)
            if len(work) != len(costs) or any(
                w.size != c.size or np.any(w < 0) for w, c in zip(work, costs, strict=True)
            ):
                raise ConfigError("work must hold one number >= 0 per option of every layer")
            object.__setattr__(self, "work", work)

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.costs)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of options of each layer."""
        return tuple(cost.size for cost in self.costs)

    def min_cost(self) -> float:
        """Smallest total cost of any choice (bits): every layer at its cheapest option."""
        return math.fsum(float(cost.min()) for cost in self.costs)

    def max_cost(self) -> float:
        """Largest total cost of any choice (bits): every layer at its most expensive option."""
        return math.fsum(float(cost.max()) for cost in self.costs)

    def min_damage(self) -> float:
        """Smallest total damage of any choice: every layer at its least damaging option."""
        return math.fsum(float(damage.min()) for damage in self.damages)

    def check_budget(self, max_cost: float) -> float:
        """``max_cost`` (bits) as a float; BudgetError if even the cheapest choice costs more."""
        max_cost = float(max_cost)
        smallest = self.min_cost()
        # Written so that a NaN budget fails too.
        if not max_cost >= smallest:
            raise BudgetError(
                f"budget {max_cost:.10g} bits is below the smallest plan on the candidate grid "
                f"({smallest:.10g} bits); raise the budget or add cheaper candidates"
            )
        return max_cost

    def total(self, choice: Sequence[int]) -> tuple[float, float]:
        """Total (cost in bits, damage) of a choice of one option index per layer.

        Raises PlanError if the choice does not have one valid index per layer.
        """
        if len(choice) != self.num_layers:
            raise PlanError(
                f"a choice needs one option index per layer: got {len(choice)} for "
                f"{self.num_layers} layers"
            )
        for i, (j, size) in enumerate(zip(choice, self.sizes, strict=True)):
            if not 0 <= j < size:
                raise PlanError(f"layer {i} has options 0..{size - 1}, the choice picks {j}")
        cost = math.fsum(float(c[j]) for c, j in zip(self.costs, choice, strict=True))
        damage = math.fsum(float(d[j]) for d, j in zip(self.damages, choice, strict=True))
        return cost, damage


def nondominated(cost: np.ndarray, damage: np.ndarray) -> np.ndarray:
    """Indices of one layer's options that no other option dominates, by increasing cost.

    Option k dominates option j if it costs no more and damages no more, and is strictly better in
    one of the two. Of options with equal cost and equal damage only the lowest index is kept, so
    the result is unique. Along the result, cost strictly increases and damage strictly decreases.
    Removing dominated options never changes the optimum of an allocation.
    """
    order = np.lexsort((np.arange(cost.size), damage, cost))
    kept = []
    best = math.inf
    for j in order:
        if damage[j] < best:
            kept.append(j)
            best = damage[j]
    return np.array(kept, dtype=np.intp)


def nondominated_by(values: Sequence[np.ndarray]) -> np.ndarray:
    """Indices (ascending) of one layer's options that no other option dominates in all of
    `values` (each one number per option, all to be minimised): k dominates j if it is no worse
    in every value and better in one. Of options equal in every value only the lowest index is
    kept. `nondominated` is the two-value case, by increasing cost."""
    table = np.stack([np.asarray(v, dtype=np.float64) for v in values])  # (values, options)
    no_worse = np.all(table[:, np.newaxis, :] <= table[:, :, np.newaxis], axis=0)  # [j, k]
    better = np.any(table[:, np.newaxis, :] < table[:, :, np.newaxis], axis=0)
    equal = no_worse & ~better
    earlier = np.arange(table.shape[1])[np.newaxis, :] < np.arange(table.shape[1])[:, np.newaxis]
    beaten = (no_worse & better) | (equal & earlier)
    return np.flatnonzero(~beaten.any(axis=1))


def screened(cost: np.ndarray, cheap: np.ndarray, margin: float) -> np.ndarray:
    """Indices (ascending) of one layer's options worth scoring exactly, judged by a cheap damage
    estimate: option j is screened out when another option costs no more and its cheap damage
    times `margin` is still below j's.

    If every option's exact damage is its cheap damage times a factor, and the factors of one
    layer's options lie within a ratio `margin` of each other, a screened-out option is strictly
    dominated by exact damage too, so it is in no optimum of any allocation and removing it
    changes no plan. `margin` (>= 1) is that assumption: the larger, the fewer options are
    screened out. Cheap damages must be >= 0; an option with cheap damage 0 is always kept.
    """
    if not margin >= 1 or math.isinf(margin):
        raise ConfigError(f"the screening margin must be a finite number >= 1, got {margin}")
    cost, cheap = np.asarray(cost, dtype=np.float64), np.asarray(cheap, dtype=np.float64)
    if cost.shape != cheap.shape or cost.ndim != 1:
        raise ConfigError("give one cost and one cheap damage per option")
    if not np.all(np.isfinite(cheap)) or np.any(cheap < 0):
        raise ConfigError(f"cheap damages must be finite and >= 0, got {cheap.tolist()}")
    no_dearer = cost[np.newaxis, :] <= cost[:, np.newaxis]  # [j, k]: k costs no more than j
    np.fill_diagonal(no_dearer, False)
    beaten = no_dearer & (margin * cheap[np.newaxis, :] < cheap[:, np.newaxis])
    return np.flatnonzero(~beaten.any(axis=1))
