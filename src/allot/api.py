"""The public surface: compress a model under a budget, apply a plan, save and load artifacts.

The pipeline reads top to bottom: fold BatchNorm -> discover layers -> profile (input statistics)
-> candidates -> allocate -> plan -> apply. Each stage is a plain function in its own module.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from allot.allocate import ALLOCATORS, Options, minimize_cost, pareto_sweep, uniform_sequence
from allot.apply import apply
from allot.budget import Budget, describe_bits, weight_bits_limit
from allot.candidates import CandidateTable, score_candidates
from allot.discover import Discovery, discover
from allot.errors import get_error_model
from allot.evaluate import calibration_loss, state_bits
from allot.exceptions import BudgetError, DataError, ModelError
from allot.fold import find_conv_bn_pairs, fold_batchnorm
from allot.methods import Method, get_method
from allot.plan import LayerPlan, Plan
from allot.prediction import check_prediction, geometry, geometry_json, plan_deltas
from allot.profile.cache import Cache
from allot.profile.engine import Profile, Settings
from allot.progress import progress_bar
from allot.refine import get_refiner
from allot.schemes import Quant
from allot.zoo.data import Dataset, describe, forward


@dataclass
class Result:
    """What `compress` returns: the compressed model, its plan, and the scored candidates."""

    model: nn.Module
    plan: Plan
    table: CandidateTable
    profile: Profile


def prepare(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]], Discovery, list[str]]:
    """A folded copy of `model`, the folded pairs, its compressible layers, and notes for the report."""
    work = copy.deepcopy(model).eval()
    pairs, note = find_conv_bn_pairs(work)
    fold_batchnorm(work, pairs)
    discovery = discover(work)
    if not discovery.layers:
        raise ModelError(
            "the model has no compressible layers (Linear, Conv1d, Conv2d)"
            + (f"; skipped: {discovery.skipped}" if discovery.skipped else "")
        )
    return work, pairs, discovery, [note] if note else []


def profile(
    work: nn.Module,
    discovery: Discovery,
    dataset: Dataset,
    *,
    settings: Settings | None = None,
    cache: Cache | None = None,
    progress: bool = True,
) -> Profile:
    """The calibration profile of a prepared (BatchNorm-folded) model's compressible layers under
    the data set's loss; statistics are computed when first asked for, and cached in `cache`."""
    return Profile(
        work,
        discovery.layers,
        list(dataset.calibration.batches(dataset.batch_size)),
        dataset.task.loss,
        settings=settings,
        cache=cache,
        progress=progress,
    )


def _check_data(model: nn.Module, dataset: Dataset) -> None:
    if len(dataset.calibration) == 0:
        raise DataError("the calibration set is empty; give at least one calibration sample")
    inputs = dataset.example_inputs(2)
    try:
        with torch.no_grad():
            outputs = forward(model.eval(), inputs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DataError(
            f"the model cannot run on data set {dataset.name!r} (inputs {describe(inputs)}): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if not torch.isfinite(outputs).all():
        raise DataError("the float model gives NaN or inf outputs on the data; check its weights")


@dataclass
class Scored:
    """A model's candidates scored by a method on calibration data: everything needed to choose
    and apply a plan under any budget (`compress_scored`), so a Pareto sweep over budgets fits
    and scores the candidates once."""

    model: nn.Module
    dataset: Dataset
    method: Method
    work: nn.Module
    folded: list[tuple[str, str]]
    discovery: Discovery
    notes: list[str]
    profile: Profile
    table: CandidateTable
    model_name: str
    seed: int
    progress: bool


def score(
    model: nn.Module,
    dataset: Dataset,
    method: str | Method,
    *,
    model_name: str = "custom",
    seed: int = 0,
    cache: Cache | None = None,
    progress: bool = True,
) -> Scored:
    """Fold, discover, profile, and fit and score every candidate of `method`'s grid.

    The input model is not modified. `cache` keeps profile statistics on disk between runs."""
    torch.manual_seed(seed)
    method = get_method(method) if isinstance(method, str) else method
    _check_data(model, dataset)
    work, pairs, discovery, notes = prepare(model)
    profiled = profile(
        work, discovery, dataset, settings=Settings(seed=seed), cache=cache, progress=progress
    )
    table = score_candidates(
        work, discovery.layers, method.grid, get_error_model(method.error_model), profiled, progress
    )
    return Scored(
        model,
        dataset,
        method,
        work,
        pairs,
        discovery,
        notes,
        profiled,
        table,
        model_name,
        seed,
        progress,
    )


def compress(
    model: nn.Module,
    dataset: Dataset,
    method: str | Method,
    budget: Budget,
    *,
    model_name: str = "custom",
    seed: int = 0,
    cache: Cache | None = None,
    progress: bool = True,
) -> Result:
    """Compress `model` with `method` under `budget`, using `dataset`'s calibration split.

    The input model is not modified. Same model, data, method, budget and seed give the same plan.
    `cache` keeps profile statistics on disk between runs (none by default).
    """
    scored = score(
        model, dataset, method, model_name=model_name, seed=seed, cache=cache, progress=progress
    )
    return compress_scored(scored, budget)


def compress_scored(scored: Scored, budget: Budget) -> Result:
    """Choose the plan for `budget` among scored candidates, apply it to a copy of the model, and
    check its predictions (for methods with a curvature error model)."""
    method, table, work, dataset = scored.method, scored.table, scored.work, scored.dataset
    layers = scored.discovery.layers

    def make_plan(choice: list[int]) -> Plan:
        return Plan(
            model=scored.model_name,
            method=method.name,
            error_model=method.error_model,
            budget=budget,
            layers=[
                LayerPlan(layer.name, layer.spec, cand.scheme, cand.damage)
                for layer, cand in zip(table.layers, table.chosen(choice), strict=True)
            ],
            folded=scored.folded,
            skipped=scored.discovery.skipped,
            metadata={
                "allocator": method.allocator,
                "dataset": dataset.name,
                "calibration_samples": len(dataset.calibration),
                "seed": scored.seed,
                "notes": scored.notes,
                "allot_version": importlib.metadata.version("allot"),
                "torch_version": torch.__version__,
            },
        )

    options = table.options()
    n_weights = sum(layer.spec.numel for layer in layers)
    if budget.kind == "lossless":
        reference = calibration_loss(work, dataset)
        choice, plan = _lossless(scored, reference, options, make_plan)
    elif budget.kind == "damage":
        choice = minimize_cost(options, float(budget.value))
        plan = make_plan(choice)
    else:
        other_bits = state_bits(work) - 32 * n_weights
        bits_cost = (
            sum(Quant(int(budget.value)).storage_bits(layer.spec) for layer in layers)
            if budget.kind == "bits"
            else None
        )
        limit = weight_bits_limit(budget, n_weights, other_bits, bits_cost)
        if limit < options.min_cost():
            reach = describe_bits(budget.kind, options.min_cost(), n_weights, other_bits)
            raise BudgetError(
                f"{budget.describe()} is out of reach for method {method.name}: its smallest plan "
                f"is {reach}; relax the budget or choose a method with smaller candidates"
            )
        choice = ALLOCATORS[method.allocator](options, limit)
        plan = make_plan(choice)
    compressed = _build(scored, plan, choice)
    plan.metadata["pareto"] = _pareto(options, n_weights)
    if get_error_model(method.error_model).curvature:
        deltas = plan_deltas(work, compressed, plan)
        check = check_prediction(scored.profile, deltas, work, compressed, dataset)
        plan.metadata["prediction"] = check.to_json()
        plan.metadata["geometry"] = geometry_json(geometry(scored.profile, deltas))
    return Result(compressed, plan, table, scored.profile)


def _build(scored: Scored, plan: Plan, choice: list[int]) -> nn.Module:
    """The plan applied to a copy of the model with the candidates scoring fitted, then refined
    as the method says (recorded in the plan's metadata)."""
    compressed = apply(
        copy.deepcopy(scored.model), plan, scored.profile, scored.table.fitted(choice)
    )
    if scored.method.refine is not None:
        get_refiner(scored.method.refine)(
            scored.work, compressed, plan, scored.dataset, scored.progress
        )
        plan.metadata["refine"] = scored.method.refine
    return compressed


def _pareto(options: Options, n_weights: int) -> list[list[float]]:
    """The allocator's convex Pareto curve as [bits per weight, predicted damage] points, cheapest
    first (error-model units; for the report's Pareto plot)."""
    points = []
    for choice in pareto_sweep(options):
        cost = sum(float(c[j]) for c, j in zip(options.costs, choice, strict=True))
        damage = sum(float(d[j]) for d, j in zip(options.damages, choice, strict=True))
        points.append([cost / n_weights, damage])
    return points


def _lossless(
    scored: Scored, reference: float, options: Options, make_plan: Callable[[list[int]], Plan]
) -> tuple[list[int], Plan]:
    """The choice and plan of the cheapest plan on the method's plan sequence whose measured
    calibration loss is not above `reference`, the float (BatchNorm-folded) model's; the sequence
    ends with every layer kept, which always qualifies.

    Under an error model that predicts the loss change itself (`second-order`, `trace`,
    `diagonal`), the sequence starts with the smallest plan predicted not to raise the loss (exact
    knapsack with damage limit 0), followed by the Pareto plans larger than it."""
    method = scored.method
    if method.allocator == "uniform":
        sequence = uniform_sequence(options)
    elif get_error_model(method.error_model).loss_change:
        start = minimize_cost(options, 0.0)
        floor = options.total(start)[0]
        sequence = [start, *(c for c in pareto_sweep(options) if options.total(c)[0] > floor)]
    else:
        sequence = pareto_sweep(options)
    for choice in progress_bar(sequence, "lossless search", scored.progress):
        plan = make_plan(choice)
        compressed = _build(scored, plan, choice)
        if calibration_loss(compressed, scored.dataset) <= reference:
            plan.metadata["lossless"] = {"float_calibration_loss": reference}
            return choice, plan
    raise BudgetError("no plan keeps the calibration loss at the float model's; this is a bug")
