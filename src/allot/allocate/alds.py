"""ALDS's own allocator (Liebenwein et al. 2021): the least largest per-layer damage, searched by
alternating a global and a local step over each layer's option families, from several seeds.

ALDS decomposes a layer in one of several structures (k input-channel groups, k among the divisors
of the channel count) at one of several ranks j. In `Options` terms each layer's options fall into
families (k), an option of family 0 (Keep) belonging to every family. From a family per layer:
- **global step**: with each layer's family fixed, one damage threshold for all layers, the
  smallest that fits the budget (`minmax` on the options of those families);
- **local step**: with each layer's cost fixed at what the global step gave it, the family whose
  best option within that cost damages least (ties: the layer's current family, then the smaller
  label); the paper rounds the rank to that cost, we take the best option not above it, so the
  plan still fits and the next global step spends what is left.
Seeds: 15, the first four with the family closest to 3, 5, 7, 9 in every layer (ties to the
larger, as the reference code picks divisors), the rest a random family per layer from a fixed
random stream, so the result is deterministic. Each seed runs the global step and then up to 4
local + global iterations (stopping early at a fixed point); the best plan seen wins: the
smallest largest damage, then the smallest total damage. A seed whose families cannot meet the
budget first moves each such layer to the family of its cheapest option (the reference code
halves k instead; k = 1 holds the cheapest decomposition).

The exact optimum of the same objective is one threshold over all options of all families
(`minmax`): a layer's cheapest option under a threshold is found across families at once. So this
search can only match or exceed `minmax`'s largest damage; it is here to reproduce the paper and to
measure what its alternation loses. Without families it is `minmax` itself.

Damage limits (`alds_within_damage`) run the same search with the global step's dual (the cheapest
threshold plan whose total damage is within the limit) and keep the cheapest plan seen. The
sequence (`alds_sequence`) is the lower envelope of every seed's threshold plans (plus those of
each layer's cheapest family): by cost, each plan whose largest damage is below every cheaper one's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from allot.allocate.minmax import minmax, minmax_within_damage, threshold_sequence
from allot.allocate.table import Options
from allot.exceptions import BudgetError

SEEDS = 15
ITERATIONS = 4
FIXED_FAMILIES = (3, 5, 7, 9)
RANDOM_SEED = 0

Assignment = list[int]
Choice = list[int]


def _labels(options: Options) -> list[np.ndarray]:
    """Each layer's families, ascending ([0] for a layer whose options all belong to every one)."""
    if options.families is None:
        return [np.zeros(1, dtype=np.int64) for _ in options.costs]
    result = []
    for family in options.families:
        labels = np.unique(family[family > 0])
        result.append(labels if labels.size else np.zeros(1, dtype=np.int64))
    return result


def _members(options: Options, layer: int, family: int) -> np.ndarray:
    """Indices of the options of `layer` in `family` (those of family 0 included)."""
    if options.families is None:
        return np.arange(options.sizes[layer])
    labels = options.families[layer]
    return np.flatnonzero((labels == family) | (labels == 0))


def _restricted(options: Options, assignment: Assignment) -> tuple[Options, list[np.ndarray]]:
    """The options of each layer's assigned family, and each layer's indices of them in
    `options` (to map a choice among them back)."""
    members = [_members(options, i, f) for i, f in enumerate(assignment)]
    sub = Options(
        [c[m] for c, m in zip(options.costs, members, strict=True)],
        [d[m] for d, m in zip(options.damages, members, strict=True)],
    )
    return sub, members


def _mapped(members: list[np.ndarray], choice: Choice) -> Choice:
    return [int(m[j]) for m, j in zip(members, choice, strict=True)]


def _global_step(
    options: Options, assignment: Assignment, step: Callable[[Options], Choice]
) -> Choice:
    """`step` (a threshold allocation) on the options of the assigned families."""
    sub, members = _restricted(options, assignment)
    return _mapped(members, step(sub))


def _seeds(labels: list[np.ndarray]) -> list[Assignment]:
    """The fixed-family seeds, then random ones (a fixed stream: the same every call)."""
    seeds = []
    for target in FIXED_FAMILIES[:SEEDS]:
        # Closest label to the target, ties to the larger: scan labels in descending order.
        seeds.append([int(f[::-1][np.argmin(np.abs(f[::-1] - target))]) for f in labels])
    rng = np.random.default_rng(RANDOM_SEED)
    for _ in range(SEEDS - len(seeds)):
        seeds.append([int(rng.choice(f)) for f in labels])
    return seeds


def _family_of(options: Options, layer: int, index: int, current: int) -> int:
    """The family an option puts its layer in (the current one for an option of every family)."""
    if options.families is None:
        return current
    label = int(options.families[layer][index])
    return label if label > 0 else current


def _repaired(options: Options, assignment: Assignment, best: Callable[[int], int]) -> Assignment:
    """Each layer whose assigned family lacks the option `best(layer)` moved to that option's
    family."""
    return [
        f if best(i) in _members(options, i, f) else _family_of(options, i, best(i), f)
        for i, f in enumerate(assignment)
    ]


def _cheapest(options: Options) -> Callable[[int], int]:
    return lambda i: int(np.lexsort((options.damages[i], options.costs[i]))[0])


def _least_damaging(options: Options) -> Callable[[int], int]:
    return lambda i: int(np.lexsort((options.costs[i], options.damages[i]))[0])


def _least_damage_within(options: Options, layer: int, family: int, budget: float) -> float:
    """The least damage of an option of `family` costing at most `budget` (inf if none does)."""
    members = _members(options, layer, family)
    allowed = members[options.costs[layer][members] <= budget]
    return float(options.damages[layer][allowed].min()) if allowed.size else math.inf


def _local_step(
    options: Options, labels: list[np.ndarray], assignment: Assignment, choice: Choice
) -> Assignment:
    """Per layer, the family whose best option costing at most the current one's damages least
    (ties: the current family, then the smaller label)."""
    result = []
    for i, (current, j) in enumerate(zip(assignment, choice, strict=True)):
        budget = float(options.costs[i][j])
        ranked = [
            (_least_damage_within(options, i, int(f), budget), int(f) != current, int(f))
            for f in labels[i]
        ]
        result.append(min(ranked)[2])
    return result


def _search(
    options: Options,
    step: Callable[[Options], Choice],
    repair: Callable[[int], int],
    key: Callable[[Choice], tuple[float, float]],
    limit: str,
) -> Choice:
    """The best plan (lowest `key`) over all seeds and their iterations; BudgetError naming
    `limit` when no seed meets it."""
    labels = _labels(options)
    seen: list[tuple[tuple[float, float], Choice]] = []
    unique = list(dict.fromkeys(tuple(seed) for seed in _seeds(labels)))
    for assignment in map(list, unique):  # a repeated seed would repeat its search
        try:
            choice = _global_step(options, assignment, step)
        except BudgetError:
            assignment = _repaired(options, assignment, repair)
            try:
                choice = _global_step(options, assignment, step)
            except BudgetError:
                continue
        seen.append((key(choice), choice))
        for _ in range(ITERATIONS):
            following = _local_step(options, labels, assignment, choice)
            if following == assignment:
                break
            try:
                choice = _global_step(options, following, step)
            except BudgetError:
                break
            assignment = following
            seen.append((key(choice), choice))
    if not seen:
        raise BudgetError(f"no seed of the ALDS search meets the {limit}")
    return min(seen, key=lambda entry: entry[0])[1]


def _largest(options: Options, choice: Choice) -> float:
    return max(float(d[j]) for d, j in zip(options.damages, choice, strict=True))


def alds(options: Options, max_cost: float) -> Choice:
    """The plan of least largest damage the ALDS search finds within ``max_cost`` bits (ties:
    the least total damage). BudgetError when even the cheapest plan costs more."""
    max_cost = options.check_budget(max_cost)
    return _search(
        options,
        lambda sub: minmax(sub, max_cost),
        _cheapest(options),
        lambda c: (_largest(options, c), options.total(c)[1]),
        f"budget {max_cost:.10g} bits; raise the budget",
    )


def alds_within_damage(options: Options, max_damage: float) -> Choice:
    """The cheapest plan the ALDS search finds whose total damage is at most ``max_damage``
    (ties: the least largest damage). BudgetError when no seed's threshold plans meet it."""
    max_damage = float(max_damage)
    return _search(
        options,
        lambda sub: minmax_within_damage(sub, max_damage),
        _least_damaging(options),
        lambda c: (options.total(c)[0], _largest(options, c)),
        f"damage limit {max_damage:.10g}; raise the limit or add less damaging candidates",
    )


def alds_sequence(options: Options) -> list[Choice]:
    """The lower envelope of the seeds' threshold plans, cheapest first (see the module
    docstring)."""
    labels = _labels(options)
    cheapest = _cheapest(options)
    assignments = [
        *_seeds(labels),
        [_family_of(options, i, cheapest(i), int(f[0])) for i, f in enumerate(labels)],
    ]
    plans = set()
    for assignment in assignments:
        sub, members = _restricted(options, assignment)
        plans.update(tuple(_mapped(members, choice)) for choice in threshold_sequence(sub))
    ordered = sorted(
        (list(c) for c in plans),
        key=lambda c: (options.total(c)[0], _largest(options, c), options.total(c)[1], c),
    )
    envelope: list[Choice] = []
    for choice in ordered:
        if not envelope or _largest(options, choice) < _largest(options, envelope[-1]):
            envelope.append(choice)
    return envelope
