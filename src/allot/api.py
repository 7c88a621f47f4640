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

from allot.allocate import ALLOCATORS, Options, pareto_sweep, uniform_sequence
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
from allot.profile.cache import Cache
from allot.profile.engine import Profile, Settings
from allot.progress import progress_bar
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

    def make_plan(choice: list[int]) -> Plan:
        layers = [
            LayerPlan(layer.name, layer.spec, cand.scheme, cand.damage)
            for layer, cand in zip(table.layers, table.chosen(choice), strict=True)
        ]
        return Plan(
            model=model_name,
            method=method.name,
            error_model=method.error_model,
            budget=budget,
            layers=layers,
            folded=pairs,
            skipped=discovery.skipped,
            metadata={
                "allocator": method.allocator,
                "dataset": dataset.name,
                "calibration_samples": len(dataset.calibration),
                "seed": seed,
                "notes": notes,
                "allot_version": importlib.metadata.version("allot"),
                "torch_version": torch.__version__,
            },
        )

    options = table.options()
    if budget.kind == "lossless":
        reference = calibration_loss(work, dataset)
        plan = _lossless(model, dataset, reference, method, options, make_plan, profiled, progress)
    else:
        n_weights = sum(layer.spec.numel for layer in discovery.layers)
        other_bits = state_bits(work) - 32 * n_weights
        bits_cost = (
            sum(Quant(int(budget.value)).storage_bits(layer.spec) for layer in discovery.layers)
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
        plan = make_plan(ALLOCATORS[method.allocator](options, limit))
    compressed = apply(copy.deepcopy(model), plan, profiled)
    return Result(compressed, plan, table, profiled)


def _lossless(
    model: nn.Module,
    dataset: Dataset,
    reference: float,
    method: Method,
    options: Options,
    make_plan: Callable[[list[int]], Plan],
    profiled: Profile,
    progress: bool,
) -> Plan:
    """The cheapest plan on the method's plan sequence whose measured calibration loss is not above
    `reference`, the float (BatchNorm-folded) model's; the sequence ends with every layer kept,
    which always qualifies."""
    sequence = uniform_sequence(options) if method.allocator == "uniform" else pareto_sweep(options)
    for choice in progress_bar(sequence, "lossless search", progress):
        plan = make_plan(choice)
        if calibration_loss(apply(copy.deepcopy(model), plan, profiled), dataset) <= reference:
            plan.metadata["lossless"] = {"float_calibration_loss": reference}
            return plan
    raise BudgetError("no plan keeps the calibration loss at the float model's; this is a bug")
