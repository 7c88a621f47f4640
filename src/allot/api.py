"""The public surface: compress a model under a budget, apply a plan, save and load artifacts.

The pipeline reads top to bottom: fold BatchNorm -> discover layers -> profile (calibration
statistics) -> candidates -> allocate -> plan -> apply -> refine. Each stage is a plain function in
its own module; data come in through the data contract (`allot.data`), and nothing here imports
the benchmark zoo.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from allot.allocate import Options, get_allocator, pareto_sweep
from allot.apply import apply
from allot.budget import Budget, describe_bits, weight_bits_limit
from allot.candidates import CandidateTable, score_candidates
from allot.data import Data, as_data, check_data
from allot.discover import Discovery, discover
from allot.errors import get_error_model
from allot.evaluate import layer_macs, layer_parameters, state_bits
from allot.exceptions import BudgetError, ConfigError, ModelError
from allot.fold import find_conv_bn_pairs, fold_batchnorm
from allot.methods import Method, get_method
from allot.plan import LayerPlan, Plan
from allot.policy import Policy
from allot.prediction import (
    check_prediction,
    geometry_json,
    operator_errors,
    plan_deltas,
)
from allot.prediction import geometry as error_geometry
from allot.profile.cache import Cache
from allot.profile.engine import Profile, Settings
from allot.profile.measure import mean_loss
from allot.refine import get_refiner
from allot.schemes import Quant
from allot.search import Trial, get_search


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
    data: Data,
    *,
    settings: Settings | None = None,
    cache: Cache | None = None,
    progress: bool = True,
) -> Profile:
    """The calibration profile of a prepared (BatchNorm-folded) model's compressible layers under
    the data's loss; statistics are computed when first asked for, and cached in `cache`."""
    return Profile(work, discovery.layers, data, settings=settings, cache=cache, progress=progress)


@dataclass
class Scored:
    """A model's candidates scored by a method on calibration data: everything needed to choose
    and apply a plan under any budget (`compress_scored`), so a Pareto sweep over budgets fits
    and scores the candidates once."""

    model: nn.Module
    data: Data
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
    policy: Policy
    samples: int


def score(
    model: nn.Module,
    data: Any,
    method: str | Method,
    *,
    policy: Policy | None = None,
    model_name: str = "custom",
    seed: int = 0,
    cache: Cache | None = None,
    progress: bool = True,
) -> Scored:
    """Fold, discover, profile, and fit and score every candidate of `method`'s grid.

    `data` follows the data contract (`allot.Data`, or an object with `to_data()`); `policy`
    keeps or pins layers by name. The input model is not modified. `cache` keeps profile
    statistics on disk between runs."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an int in 0..2**63 - 1, got {seed!r:.40}")
    torch.manual_seed(seed)
    data = as_data(data)
    method = get_method(method) if isinstance(method, str) else method
    policy = policy or Policy()
    check_data(model, data)
    work, pairs, discovery, notes = prepare(model)
    policy.check(discovery.layers)
    profiled = profile(
        work, discovery, data, settings=Settings(seed=seed), cache=cache, progress=progress
    )
    table = score_candidates(
        work,
        discovery.layers,
        policy.grid(method.grid),
        get_error_model(method.error_model),
        profiled,
        progress,
        method.screen,
    )
    return Scored(
        model,
        data,
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
        policy,
        data.samples(),
    )


def compress(
    model: nn.Module,
    data: Any,
    method: str | Method,
    budget: Budget,
    *,
    policy: Policy | None = None,
    refinement: Refinement | None = None,
    model_name: str = "custom",
    seed: int = 0,
    cache: Cache | None = None,
    progress: bool = True,
    geometry: bool = True,
) -> Result:
    """Compress `model` with `method` under `budget`, using `data`'s calibration batches.

    The input model is not modified. Same model, data, method, budget and seed give the same plan.
    `policy` keeps layers in float or pins their scheme; `refinement` replaces the method's
    refinement (`Refinement.of(method, "finetune", epochs=2)`); `cache` keeps profile statistics
    on disk between runs (none by default); `geometry=False` leaves out the report's error
    geometry (`compress_scored`).
    """
    scored = score(
        model,
        data,
        method,
        policy=policy,
        model_name=model_name,
        seed=seed,
        cache=cache,
        progress=progress,
    )
    return compress_scored(scored, budget, refinement, geometry=geometry)


def compress_scored(
    scored: Scored,
    budget: Budget,
    refinement: Refinement | None = None,
    *,
    geometry: bool = True,
) -> Result:
    """Choose the plan for `budget` among scored candidates, apply it to a copy of the model,
    refine it (the method's refinement, or `refinement`), and check its predictions against the
    second-order model and measurement (for methods whose error model reads curvature or predicts
    the loss change).

    `geometry=False` leaves out the report's error geometry of curvature methods: it needs every
    layer's Lanczos eigenpairs, `Settings.lanczos_iterations` lock-step HVP sweeps (a third to a
    half of a compression's passes on the zoo models) unless the profile's cache has them."""
    method, table, work, data = scored.method, scored.table, scored.work, scored.data
    allocator = get_allocator(method.allocator)
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
                "dataset": data.name,
                "calibration_samples": scored.samples,
                "seed": scored.seed,
                "policy": scored.policy.to_json(),
                "notes": scored.notes,
                "allot_version": importlib.metadata.version("allot"),
                "torch_version": torch.__version__,
            },
        )

    options = table.options()
    n_weights = sum(layer.spec.numel for layer in layers)
    if budget.measured:
        reference = mean_loss(work, data)
        refinement = refinement or Refinement.of(method)

        def swap(model: nn.Module, choice: list[int], indices: Sequence[int]) -> nn.Module:
            swapped = copy.deepcopy(model)
            for i in indices:
                module = table.candidates[i][choice[i]].module
                swapped.set_submodule(table.layers[i].name, copy.deepcopy(module))
            return swapped

        found = get_search(method.search).run(
            Trial(
                options,
                allocator,
                reference + budget.tolerance,
                budget.tolerance,
                get_error_model(method.error_model).loss_change,
                make_plan,
                lambda plan, choice: _apply(scored, plan, choice),
                swap,
                lambda model, plan: _refine(scored, model, plan, refinement),
                refinement.name is not None,
                lambda model: mean_loss(model, data),
                method.name,
                scored.progress,
            )
        )
        choice, plan, compressed = found.choice, found.plan, found.model
        plan.metadata["lossless"] = {
            "float_calibration_loss": reference,
            "tolerance": budget.tolerance,
            "search": method.search,
            **found.record,
        }
    else:
        macs: dict[str, float] | None = None  # the MACs limit and the plan's MACs, when limited
        if budget.kind == "damage":
            choice = allocator.within_damage(options, float(budget.value))
        elif budget.macs_ratio is not None:
            if allocator.within_cost_and_work is None:
                raise ConfigError(
                    f"method {method.name}'s allocator {allocator.name!r} cannot limit MACs; "
                    "leave out the MACs ratio or use a method that allocates by knapsack"
                )
            options, max_macs = _with_macs(scored, options, budget.macs_ratio)
            limit = _size_limit(scored, budget, options)
            try:
                choice = allocator.within_cost_and_work(options, limit, max_macs)
            except BudgetError as exc:
                raise BudgetError(
                    f"{budget.describe()} is out of reach for method {method.name}: {exc}"
                ) from None
            layer_work = options.work or ()
            planned = math.fsum(float(w[j]) for w, j in zip(layer_work, choice, strict=True))
            macs = {"limit": max_macs, "planned": planned}
        else:
            choice = allocator.within_cost(options, _size_limit(scored, budget, options))
        plan = make_plan(choice)
        if macs is not None:
            plan.metadata["macs"] = macs
        compressed = _refine(scored, _apply(scored, plan, choice), plan, refinement)
    plan.metadata["pareto"] = _pareto(options, n_weights)
    alternatives = table.alternatives(choice)
    if alternatives is not None:
        plan.metadata["families"] = alternatives
    if table.screened_out is not None:
        plan.metadata["screened"] = {
            "margin": method.screen,
            "layers": {
                layer.name: {"screened_out": out, "scored": len(row)}
                for layer, out, row in zip(
                    table.layers, table.screened_out, table.candidates, strict=True
                )
            },
        }
    plan.metadata["layers"] = layer_costs(work, compressed, plan, data)
    bounded = operator_errors(work, table.fitted(choice), plan)
    if bounded:
        plan.metadata["operator_error"] = bounded
    error_model = get_error_model(method.error_model)
    if error_model.curvature or error_model.loss_change:
        deltas = plan_deltas(work, compressed, plan)
        check = check_prediction(scored.profile, deltas, work, compressed, data)
        plan.metadata["prediction"] = check.to_json()
    if error_model.curvature and geometry:
        plan.metadata["geometry"] = geometry_json(error_geometry(scored.profile, deltas))
    elif error_model.curvature:
        plan.metadata["notes"] = [
            *plan.metadata["notes"],
            "error geometry not computed (geometry=False, `--no-geometry`)",
        ]
    return Result(compressed, plan, table, scored.profile)


@dataclass(frozen=True)
class Refinement:
    """Which refinement runs after a plan is applied, with which settings (plain values for the
    refiner's settings dataclass). `None` as a name means none."""

    name: str | None
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, method: Method, name: str | None = None, **settings: Any) -> Refinement:
        """The method's refinement, or `name`'s when given (the method's settings apply only to
        its own refiner), with `settings` overriding."""
        if name is None or name == method.refine:
            return cls(method.refine, {**method.refine_settings, **settings})
        return cls(name, settings)


def _apply(scored: Scored, plan: Plan, choice: list[int]) -> nn.Module:
    """The plan applied to a copy of the model with the candidates scoring fitted."""
    return apply(copy.deepcopy(scored.model), plan, scored.profile, scored.table.fitted(choice))


def _refine(
    scored: Scored, compressed: nn.Module, plan: Plan, refinement: Refinement | None = None
) -> nn.Module:
    """`compressed` (the plan applied) refined in place by the method's refinement, or by
    `refinement` when given; what ran is recorded in the plan's metadata."""
    refinement = refinement or Refinement.of(scored.method)
    if refinement.name is not None:
        _run_refinement(scored.work, compressed, plan, scored.data, refinement, scored.progress)
    return compressed


def _run_refinement(
    work: nn.Module,
    compressed: nn.Module,
    plan: Plan,
    data: Data,
    refinement: Refinement,
    progress: bool,
) -> None:
    """Run a named refinement on an applied plan in place; record it in the plan's metadata."""
    refiner = get_refiner(refinement.name or "")
    settings = refiner.configure(refinement.settings)
    refiner.run(work, compressed, plan, data, settings, progress)
    plan.metadata["refine"] = {"name": refiner.name, "settings": dataclasses.asdict(settings)}


def refine_model(
    compressed: nn.Module,
    plan: Plan,
    float_model: nn.Module,
    data: Any,
    refinement: Refinement,
    *,
    progress: bool = True,
) -> nn.Module:
    """Refine a compressed model (a plan applied to `float_model`, e.g. a loaded artifact) in
    place with `refinement` (`Refinement("lc")`), against its float model folded as the plan
    says; returns it. The plan's metadata records the refinement."""
    if refinement.name is None:
        raise ConfigError("name the refinement to run, e.g. Refinement('lc')")
    data = as_data(data)
    check_data(float_model, data)
    work = fold_batchnorm(copy.deepcopy(float_model).eval(), plan.folded)
    plan.check_fits(discover(work))
    _run_refinement(work, compressed, plan, data, refinement, progress)
    return compressed.eval()


def _pareto(options: Options, n_weights: int) -> list[list[float]]:
    """The convex Pareto curve of the candidates as [bits per weight, predicted damage] points,
    cheapest first (error-model units; for the report's Pareto plot)."""
    points = []
    for choice in pareto_sweep(options):
        cost, damage = options.total(choice)
        points.append([cost / n_weights, damage])
    return points


def _with_macs(scored: Scored, options: Options, macs_ratio: float) -> tuple[Options, float]:
    """`options` with each candidate's multiply-accumulates on one calibration sample as their
    work, and the most MACs `macs_ratio` leaves the compressible layers."""
    dense = layer_macs(scored.work, scored.data.example_inputs(1))
    table = scored.table
    float_macs = {layer.name: dense.get(layer.name, (0, 0))[0] for layer in table.layers}
    positions = {
        layer.name: float_macs[layer.name] / (layer.spec.out_features * layer.spec.fan_in)
        for layer in table.layers
    }
    total = sum(float_macs.values())
    options = Options(options.costs, options.damages, options.families, table.macs(positions))
    assert options.work is not None
    least = math.fsum(float(w.min()) for w in options.work)
    if least > total / macs_ratio:
        raise BudgetError(
            f"MACs ratio {macs_ratio} is out of reach for method {scored.method.name}: its plan "
            f"with the fewest MACs executes 1/{total / least:.4g} of the float layers' MACs"
        )
    return options, total / macs_ratio


def _size_limit(scored: Scored, budget: Budget, options: Options) -> float:
    """The most bits the compressible weights may take under a size budget; `BudgetError` when
    even the method's smallest plan is larger."""
    layers = scored.discovery.layers
    n_weights = sum(layer.spec.numel for layer in layers)
    other_bits = state_bits(scored.work) - 32 * n_weights
    bits_cost = (
        sum(Quant(int(budget.value)).storage_bits(layer.spec) for layer in layers)
        if budget.kind == "bits"
        else None
    )
    limit = weight_bits_limit(budget, n_weights, other_bits, bits_cost)
    if limit < options.min_cost():
        reach = describe_bits(budget.kind, options.min_cost(), n_weights, other_bits)
        raise BudgetError(
            f"{budget.describe()} is out of reach for method {scored.method.name}: its smallest "
            f"plan is {reach}; relax the budget or choose a method with smaller candidates"
        )
    return limit


def layer_costs(
    work: nn.Module, compressed: nn.Module, plan: Plan, data: Data
) -> dict[str, dict[str, list[int]]]:
    """Per planned layer: the numbers its weight stores and the multiply-accumulates of one
    forward pass on one calibration sample, each as [float, compressed]."""
    names = [layer.name for layer in plan.layers]
    sample = data.example_inputs(1)
    before, after = layer_parameters(work, names), layer_parameters(compressed, names)
    dense, executed = layer_macs(work, sample), layer_macs(compressed, sample)
    return {
        name: {
            "parameters": [before[name], after[name]],
            "macs": [dense.get(name, (0, 0))[1], executed.get(name, (0, 0))[1]],
        }
        for name in names
    }
