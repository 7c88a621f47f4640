"""Lossless searches: how a lossless budget finds a small plan whose *measured* calibration loss is
not above the float model's (a `lossless` budget), or not above it plus a tolerance (a `loss`
budget).

A method names its search (`Method.search`); every search works on the scored candidates
(`Options`: cost in bits and predicted damage of every layer's options) through a `Trial`, which
turns a choice (one option index per layer) into a plan and a compressed model, refines it with
the method's refinement, and measures calibration losses. Searches never branch on a method or an
allocator; they call what the trial offers.

Registered:
- `sequence`: walk the allocator's sequence of plans from the cheapest up, each applied and
  refined, and take the first whose measured loss is not above the float model's. Under an error
  model that predicts the loss change itself (`second-order`, `trace`, `diagonal`), the walk
  starts at the smallest plan *predicted* not to raise the loss beyond the budget's tolerance (the
  allocator's least cost within that damage).
- `compact`: greedy cuts from the float model down (the compact algorithm of the lossless
  low-rank paper; docs/lowrank.md). Every layer's next cut is its cheaper option with the
  smallest predicted loss change per bit saved (per parameter: factors are float32); cuts are
  taken in that order, a batch at a time, each batch swapped into the current model and kept only
  if the measured calibration loss stays within the limit. A rejected batch is halved and tried
  again; a rejected single cut is not tried again in that phase, nor any deeper cut of its layer.
  When no cut is left, the method's refinement runs (for low-rank: error feedback and the joint
  step): first on the current model with the best next cut taken on credit, kept if the refined
  model is within the limit, else on the current model as it is, kept if that lowers its loss;
  the slack a refinement makes is then searched again with fresh cuts, for at most `ROUNDS`
  rounds. The result is the smallest model measured within the limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from allot.allocate import Allocator, Options
from allot.exceptions import BudgetError
from allot.plan import Plan
from allot.progress import progress_bar, progress_counter
from allot.registry import Registry

Choice = list[int]
ROUNDS = 4
"""Most cut-then-refine rounds of the compact search."""


@dataclass
class Trial:
    """What a search may do with one method's scored candidates.

    `plan(choice)` names the plan of a choice; `apply(plan, choice)` applies it to a copy of the
    float model with the candidates scoring fitted; `swap(model, choice, layers)` is a copy of
    `model` whose layers at the indices `layers` take their fitted candidates of `choice`;
    `refine(model, plan)` runs the method's refinement in place (recording it in the plan) and
    `refines` says whether the method has one; `measure(model)` is the calibration loss (loss
    units) and `limit` the most it may be: the float (BatchNorm-folded) model's plus the budget's
    `tolerance`. `loss_change` says whether the damages are predicted loss changes themselves
    (gradient term included); `method` names the method in messages."""

    options: Options
    allocator: Allocator
    limit: float
    tolerance: float
    loss_change: bool
    plan: Callable[[Choice], Plan]
    apply: Callable[[Plan, Choice], nn.Module]
    swap: Callable[[nn.Module, Choice, Sequence[int]], nn.Module]
    refine: Callable[[nn.Module, Plan], nn.Module]
    refines: bool
    measure: Callable[[nn.Module], float]
    method: str
    progress: bool = True


@dataclass
class Found:
    """A search's result: the choice, its plan, the compressed model built for it, and what the
    search records in the plan's metadata (`lossless`)."""

    choice: Choice
    plan: Plan
    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Search:
    """A named lossless search: `run(trial) -> Found`, `BudgetError` when no plan it tries keeps
    the calibration loss."""

    name: str
    run: Callable[[Trial], Found]
    description: str = ""


SEARCHES: Registry[Search] = Registry("lossless search")


def register_search(search: Search) -> Search:
    """Register a lossless search under its name (methods name it in `Method.search`)."""
    return SEARCHES.add(search.name, search)


def get_search(name: str) -> Search:
    """The registered lossless search `name`; `ConfigError` listing the known ones otherwise."""
    return SEARCHES[name]


def _no_plan(trial: Trial) -> BudgetError:
    within = f" plus {trial.tolerance:g}" if trial.tolerance else ""
    return BudgetError(
        f"no plan of method {trial.method} keeps the calibration loss at or below the float "
        f"model's{within}; use a method whose grid can keep layers in float"
    )


def sequence_search(trial: Trial) -> Found:
    """The cheapest plan on the allocator's sequence whose measured calibration loss is not above
    the float model's (see the module docstring)."""
    options = trial.options
    sequence = trial.allocator.sequence(options)
    if trial.loss_change and options.min_damage() <= trial.tolerance:
        start = trial.allocator.within_damage(options, trial.tolerance)
        floor = options.total(start)[0]
        sequence = [start, *(c for c in sequence if options.total(c)[0] > floor)]
    for tried, choice in enumerate(progress_bar(sequence, "lossless search", trial.progress), 1):
        plan = trial.plan(choice)
        model = trial.refine(trial.apply(plan, choice), plan)
        loss = trial.measure(model)
        if loss <= trial.limit:
            return Found(choice, plan, model, {"plans_measured": tried, "calibration_loss": loss})
    raise _no_plan(trial)


def next_cut(cost: Any, damage: Any, current: int, floor: float) -> int | None:
    """The option a layer at option `current` is cut to next: of its options cheaper than
    `current` and dearer than `floor` bits, the one with the smallest predicted damage change per
    bit saved (ties: the smaller cut, then the lower index); None when there is none."""
    best: tuple[float, float, int] | None = None
    for k in range(len(cost)):
        saved = float(cost[current] - cost[k])
        if saved <= 0 or cost[k] <= floor:
            continue
        key = (float(damage[k] - damage[current]) / saved, saved, k)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


@dataclass
class _State:
    """Where the compact search stands: the current choice, its plan, model and measured loss."""

    choice: Choice
    plan: Plan
    model: nn.Module
    loss: float


def compact_search(trial: Trial, first_batch: int = 4, rounds: int = ROUNDS) -> Found:
    """Greedy cuts kept while the measured calibration loss stays within the limit, alternating
    with the method's refinement (module docstring). `first_batch` cuts are tried together first;
    the batch size doubles after each kept batch and halves after each rejected one. A refinement
    round first refines the model with the best next cut taken on credit (kept if the refined
    model is within the limit), else the model as it is when cuts were kept since the last
    refinement (kept if its loss falls). Each measurement is recorded in `history` as
    [weight bits, calibration loss, kept]."""
    options = trial.options
    start = [_dearest(c, d) for c, d in zip(options.costs, options.damages, strict=True)]
    plan = trial.plan(start)
    model = trial.apply(plan, start)
    state = _State(start, plan, model, trial.measure(model))
    if state.loss > trial.limit:
        raise _no_plan(trial)
    history: list[list[Any]] = [[options.total(start)[0], state.loss, True]]
    refined_rounds, changed = 0, True
    with progress_counter("compact search", trial.progress) as step:
        for _ in range(rounds):
            changed = _cut(trial, state, max(1, first_batch), history, step) > 0 or changed
            if not trial.refines or not _refine_round(trial, state, changed, history):
                break
            refined_rounds, changed = refined_rounds + 1, False
    record = {
        "plans_measured": len(history),
        "refined_rounds": refined_rounds,
        "calibration_loss": state.loss,
        "history": history,
    }
    return Found(state.choice, state.plan, state.model, record)


def _refine_round(trial: Trial, state: _State, changed: bool, history: list[list[Any]]) -> bool:
    """Refine the current model with the best next cut on credit, or (when `changed`) as it is;
    update `state` and return True when one is kept."""
    options = trial.options
    tries: list[Choice] = []
    cut = _cuts(options, state.choice, [-math.inf] * options.num_layers)
    if cut:
        _, i, k = cut[0]
        tries.append([k if j == i else c for j, c in enumerate(state.choice)])
    if changed:
        tries.append(state.choice)
    for choice in tries:
        swapped = [i for i, (a, b) in enumerate(zip(choice, state.choice, strict=True)) if a != b]
        plan = _carried(trial.plan(choice), state.plan)
        model = trial.refine(trial.swap(state.model, choice, swapped), plan)
        loss = trial.measure(model)
        better = loss <= trial.limit if choice is not state.choice else loss < state.loss
        history.append([options.total(choice)[0], loss, better])
        if better:
            state.choice, state.plan, state.model, state.loss = choice, plan, model, loss
            return True
    return False


def _carried(plan: Plan, before: Plan) -> Plan:
    """`plan` with the metadata entries only `before` has (what refined the model before, such as
    the refinement's record, still shapes the model the new plan describes)."""
    plan.metadata = {**before.metadata, **plan.metadata}
    return plan


def _cuts(options: Options, choice: Choice, floors: list[float]) -> list[tuple[float, int, int]]:
    """Every layer's next cut (`next_cut`) as (predicted damage change per bit saved, layer,
    option), best first."""
    cuts = []
    for i, (cost, damage) in enumerate(zip(options.costs, options.damages, strict=True)):
        k = next_cut(cost, damage, choice[i], floors[i])
        if k is not None:
            saved = float(cost[choice[i]] - cost[k])
            cuts.append((float(damage[k] - damage[choice[i]]) / saved, i, k))
    return sorted(cuts)


def _cut(
    trial: Trial, state: _State, batch: int, history: list[list[Any]], step: Callable[[], None]
) -> int:
    """One phase of greedy cuts from `state` (updated in place); returns how many were kept."""
    options = trial.options
    floors = [-math.inf] * options.num_layers  # a layer's cuts must stay dearer than this
    kept = 0
    while cuts := _cuts(options, state.choice, floors):
        taken = cuts[:batch]
        choice = list(state.choice)
        for _, i, k in taken:
            choice[i] = k
        model = trial.swap(state.model, choice, [i for _, i, _ in taken])
        loss = trial.measure(model)
        step()
        history.append([options.total(choice)[0], loss, loss <= trial.limit])
        if loss <= trial.limit:
            plan = _carried(trial.plan(choice), state.plan)
            state.choice, state.plan, state.model, state.loss = choice, plan, model, loss
            kept += len(taken)
            batch *= 2
        elif len(taken) > 1:
            batch = len(taken) // 2
        else:
            _, i, k = taken[0]
            floors[i] = float(options.costs[i][k])
    return kept


def _dearest(cost: Any, damage: Any) -> int:
    """A layer's most expensive option (ties: the least damaging, then the lowest index): where
    the compact search starts (float, when the grid can keep the layer)."""
    return min(range(len(cost)), key=lambda k: (-float(cost[k]), float(damage[k]), k))


register_search(
    Search(
        "sequence",
        sequence_search,
        "the cheapest plan on the allocator's sequence within the float calibration loss",
    )
)
register_search(
    Search(
        "compact",
        compact_search,
        "greedy cuts by predicted loss change per bit saved, each batch kept only if the measured "
        "calibration loss stays within the float model's, alternating with the refinement",
    )
)
