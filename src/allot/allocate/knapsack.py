"""Exact multiple-choice knapsack: one option per layer, least damage under a cost budget or least
cost under a damage limit, solved as a 0/1 integer program with HiGHS (scipy.optimize.milp).

A MILP solver works to tolerances (about 1e-6, absolute), so this module makes the answer exact:

- before solving, dominated options are removed and, per layer, the smallest value is subtracted
  (neither changes which choice is best);
- values that are all whole numbers (bit counts) are divided by their greatest common divisor, so
  one unit of the problem is at least one bit: HiGHS then knows the objective is integral and
  proves optimality to the last bit, whether costs are 1e3 or 1e9 bits. Other values (damages)
  are scaled to at most 1, so choices whose damages differ by less than about 1e-6 of the largest
  per-layer damage spread count as ties;
- HiGHS runs with no relative gap and with presolve off: HiGHS's MIP presolve (1.12, in scipy
  1.17) returned clearly suboptimal answers as optimal on small instances of exactly this problem;
- the rounded answer is checked against the limit in float64 with the same totals as
  `Options.total`. A choice that breaks the limit by less than the solver's tolerance is cut off
  by a constraint that forbids exactly that choice, and the problem is solved again. An infeasible
  choice is never returned.

Ties are broken by a second solve: of all choices with the least damage, the cheapest (and, for
`minimize_cost`, of all cheapest choices the least damaging). The result depends only on the input.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from allot.allocate.table import Options, nondominated, nondominated_by
from allot.exceptions import BudgetError, ConfigError

# Presolve off: see the module docstring.
_HIGHS_OPTIONS = {"presolve": False, "mip_rel_gap": 0.0}
# Whole numbers of more units than this are scaled instead: summed over a few dozen layers,
# float64 would no longer resolve one unit.
_MAX_UNITS = 2.0**40
# Each round cuts off one choice that HiGHS accepted within its tolerance but that breaks the limit.
_MAX_ROUNDS = 32


@contextlib.contextmanager
def _silent_stdout() -> Iterator[None]:
    """Silence C-level stdout: HiGHS 1.12 prints a stray debug line from its MIP solver
    (`HighsMipSolverData::transformNewIntegerFeasibleSolution`) straight to file descriptor 1."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capture, notebooks)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def minimize_damage(options: Options, max_cost: float, max_work: float | None = None) -> list[int]:
    """The choice with the least total damage whose total cost is at most ``max_cost`` bits (and,
    with ``max_work``, whose total `Options.work` is at most that too).

    Of several choices with the least damage, the cheapest is returned. Returns one option index
    per layer. Raises BudgetError if even the cheapest choice costs more than ``max_cost``, or if
    no choice meets both limits.
    """
    max_cost = options.check_budget(max_cost)
    if max_work is None:
        fronts, costs, damages = _fronts(options)
        choice = _lexicographic(damages, costs, [(costs, max_cost)])
        return [int(front[j]) for front, j in zip(fronts, choice, strict=True)]
    if options.work is None:
        raise ConfigError("a work limit needs options that say each option's work")
    max_work = float(max_work)
    least = math.fsum(float(w.min()) for w in options.work)
    if not max_work >= least:
        raise BudgetError(
            f"work limit {max_work:.10g} is below the least work of any plan on the candidate "
            f"grid ({least:.10g}); raise it or add candidates that do less work"
        )
    fronts = [
        nondominated_by((c, w, d))
        for c, w, d in zip(options.costs, options.work, options.damages, strict=True)
    ]
    costs, work, damages = (
        [v[front] for v, front in zip(values, fronts, strict=True)]
        for values in (options.costs, options.work, options.damages)
    )
    choice = _lexicographic(damages, costs, [(costs, max_cost), (work, max_work)])
    if choice is None:
        raise BudgetError(
            f"no plan on the candidate grid stores at most {max_cost:.10g} bits and does at most "
            f"{max_work:.10g} work (MACs) at once; raise one of the two limits"
        )
    return [int(front[j]) for front, j in zip(fronts, choice, strict=True)]


def minimize_cost(options: Options, max_damage: float) -> list[int]:
    """The cheapest choice (total bits) whose total damage is at most ``max_damage``.

    Of several cheapest choices, the least damaging is returned. Returns one option index per
    layer. Raises BudgetError if even the least damaging choice damages more than ``max_damage``.
    """
    max_damage = float(max_damage)
    smallest = options.min_damage()
    # Written so that a NaN limit fails too.
    if not max_damage >= smallest:
        raise BudgetError(
            f"damage limit {max_damage:.10g} is below the smallest damage reachable on the "
            f"candidate grid ({smallest:.10g}); raise the limit or add less damaging candidates"
        )
    fronts, costs, damages = _fronts(options)
    choice = _lexicographic(costs, damages, [(damages, max_damage)])
    return [int(front[j]) for front, j in zip(fronts, choice, strict=True)]


def _fronts(options: Options) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per layer: the indices of the non-dominated options, and their costs and damages."""
    fronts = [nondominated(c, d) for c, d in zip(options.costs, options.damages, strict=True)]
    costs = [c[front] for c, front in zip(options.costs, fronts, strict=True)]
    damages = [d[front] for d, front in zip(options.damages, fronts, strict=True)]
    return fronts, costs, damages


def _total(values: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    return math.fsum(float(v[j]) for v, j in zip(values, choice, strict=True))


def _unit(values: np.ndarray) -> float:
    """The unit HiGHS sees ``values`` (>= 0, not all 0) in: their greatest common divisor if they
    are whole numbers and at most 2**40 such units, otherwise their largest value."""
    largest = float(values.max())
    # 2**53: whole numbers up to here are exact in float64 and in int64.
    if largest <= 2**53 and np.all(values == np.round(values)):
        unit = float(np.gcd.reduce(values.astype(np.int64)))
        if largest / unit <= _MAX_UNITS:
            return unit
    return largest


Limits = list[tuple[Sequence[np.ndarray], float]]
"""Constraints: per-layer values whose total must be at most the limit."""


def _lexicographic(
    objective: Sequence[np.ndarray], secondary: Sequence[np.ndarray], limits: Limits
) -> list[int] | None:
    """Least total objective within `limits`; of those, least total `secondary` (None when no
    choice meets the limits, which the callers rule out for a single limit).

    The inputs are per-layer Pareto fronts (see `_solve`).
    """
    first = _solve(objective, limits)
    if first is _INFEASIBLE:
        if len(limits) == 1:
            raise RuntimeError(
                "HiGHS found no choice within the limit although one exists; this is a bug in allot"
            )
        return None
    if first is None:
        raise RuntimeError(
            "HiGHS found no choice within the limit although one exists; this is a bug in allot"
        )
    # Ties: the secondary total least, limited to the best objective just found (and to the other
    # limits). Its answer is at least as good in both totals, unless HiGHS fails, and then `first`
    # stands.
    others = [(values, limit) for values, limit in limits if values is not secondary]
    second = _solve(secondary, [(objective, _total(objective, first)), *others])
    if isinstance(second, list) and _total(secondary, second) <= _total(secondary, first):
        return second
    return first


_INFEASIBLE = "infeasible"


def _solve(objective: Sequence[np.ndarray], limits: Limits) -> list[int] | str | None:
    """Least total objective with every limit's total at most its limit; `_INFEASIBLE` when no
    choice meets them, None if HiGHS fails.

    Each layer's options are non-dominated (a Pareto front of objective and limits). With one
    limit, the choice of every layer's smallest value must fit it.
    """
    # Drop options that break a limit even with every other layer at its smallest value. The
    # test uses the exact totals, so no option of a feasible choice is dropped.
    keep = [np.ones(values.size, dtype=bool) for values in objective]
    floors = []
    for constrained, limit in limits:
        floor = [float(values.min()) for values in constrained]
        floors.append(floor)
        for i, values in enumerate(constrained):
            others = floor[:i] + floor[i + 1 :]
            keep[i] &= np.array([math.fsum([*others, float(v)]) <= limit for v in values])
    kept = [np.flatnonzero(k) for k in keep]
    if any(ix.size == 0 for ix in kept):
        return _INFEASIBLE

    def fits(choice: list[int]) -> bool:
        return all(_total(values, choice) <= limit for values, limit in limits)

    # Without the limits every layer takes its best option; if that choice fits, it is optimal.
    best = [int(ix[np.argmin(o[ix])]) for o, ix in zip(objective, kept, strict=True)]
    if fits(best):
        return best

    counts = [ix.size for ix in kept]
    start = np.concatenate(([0], np.cumsum(counts)))
    num_layers, num_vars = len(kept), int(start[-1])
    # Shifted per layer: a constant per layer changes no decision.
    c = np.concatenate([o[ix] - o[ix].min() for o, ix in zip(objective, kept, strict=True)])
    c /= _unit(c) if c.any() else 1.0
    layer_of = np.repeat(np.arange(num_layers), counts)
    one_each = csr_array((np.ones(num_vars), (layer_of, np.arange(num_vars))))
    rows = [LinearConstraint(one_each, 1, 1)]
    for (constrained, limit), floor in zip(limits, floors, strict=True):
        a = np.concatenate([k[ix] - k[ix].min() for k, ix in zip(constrained, kept, strict=True)])
        unit = _unit(a) if a.any() else 1.0
        rows.append(
            LinearConstraint(a[np.newaxis, :] / unit, -np.inf, (limit - math.fsum(floor)) / unit)
        )
    cut_off: list[np.ndarray] = []  # variables of choices HiGHS accepted that break a limit
    for _ in range(_MAX_ROUNDS):
        if cut_off:
            cut_vars = np.concatenate(cut_off)
            cut_rows = np.repeat(np.arange(len(cut_off)), num_layers)
            cuts = csr_array(
                (np.ones(cut_vars.size), (cut_rows, cut_vars)), (len(cut_off), num_vars)
            )
            # At least one layer must differ from each cut-off choice.
            rows_now = [*rows, LinearConstraint(cuts, -np.inf, num_layers - 1)]
        else:
            rows_now = rows
        with _silent_stdout():
            result = milp(
                c,
                integrality=np.ones(num_vars),
                bounds=Bounds(0, 1),
                constraints=rows_now,
                options=_HIGHS_OPTIONS,
            )
        if result.status == 2:
            return _INFEASIBLE
        if result.status != 0:
            return None
        local = [int(np.argmax(result.x[start[i] : start[i + 1]])) for i in range(num_layers)]
        choice = [int(ix[j]) for ix, j in zip(kept, local, strict=True)]
        if fits(choice):
            return choice
        cut_off.append(start[:-1] + np.array(local))
    return None
