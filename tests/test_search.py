"""Lossless searches: the compact search on a synthetic model of losses (every measurement is
known), and both searches through `compress` on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from allot import Budget, compress
from allot.allocate import Options, get_allocator
from allot.exceptions import BudgetError
from allot.methods import Method, get_method
from allot.profile.measure import mean_loss
from allot.search import SEARCHES, Search, Trial, compact_search, next_cut
from allot.zoo import create_model

REFERENCE = 1.0


class Choice(nn.Module):
    """A stand-in for a compressed model: it only carries the choice it was built for."""

    def __init__(self, choice: list[int], refined: int = 0) -> None:
        super().__init__()
        self.choice = list(choice)
        self.refined = refined


def _synthetic(
    true: list[list[float]], predicted: list[list[float]], relief: float = 0.0
) -> tuple[Trial, list[tuple[list[int], float]]]:
    """A trial over layers whose options j cost j bits (the last is float) and whose measured loss
    is REFERENCE plus the sum of each layer's `true` increase, minus `relief` per refinement; the
    list records every measurement."""
    options = Options([np.arange(len(row), dtype=float) for row in true], predicted)
    measured: list[tuple[list[int], float]] = []

    def measure(model: Choice) -> float:
        loss = REFERENCE + sum(row[j] for row, j in zip(true, model.choice, strict=True))
        loss -= relief * model.refined
        measured.append((list(model.choice), loss))
        return loss

    def swap(model: Choice, choice: list[int], layers) -> Choice:
        new = Choice(model.choice, model.refined)
        for i in layers:
            new.choice[i] = choice[i]
        return new

    def refine(model: Choice, _plan) -> Choice:
        model.refined += 1
        return model

    trial = Trial(
        options,
        get_allocator("knapsack"),
        REFERENCE,
        0.0,
        True,
        plan=lambda choice: SimpleNamespace(choice=list(choice), metadata={}),
        apply=lambda _plan, choice: Choice(choice),
        swap=swap,
        refine=refine,
        refines=relief > 0,
        measure=measure,
        method="synthetic",
        progress=False,
    )
    return trial, measured


def _monotone_losses(seed: int, layers: int = 6, options: int = 7) -> list[list[float]]:
    """Per layer, a loss increase that grows as the layer is cut deeper (0 at float, the last)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(layers):
        steps = rng.exponential(0.02, options - 1) * rng.choice([0.1, 1, 10])
        rows.append([*np.cumsum(steps[::-1])[::-1].tolist(), 0.0])
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_compact_keeps_every_cut_within_the_float_loss_and_stops_only_at_its_limit(seed) -> None:
    true = _monotone_losses(seed)
    noisy = np.random.default_rng(seed + 100)
    predicted = [[v * noisy.uniform(0.5, 2) for v in row] for row in true]
    trial, measured = _synthetic(true, predicted)
    found = compact_search(trial)
    kept = [entry for entry in found.record["history"] if entry[2]]
    assert kept and all(loss <= REFERENCE for _, loss, _ in kept)
    final = REFERENCE + sum(row[j] for row, j in zip(true, found.choice, strict=True))
    assert final == found.record["calibration_loss"] <= REFERENCE
    assert found.model.choice == found.choice and found.plan.choice == found.choice
    # no measurement was repeated: a rejected cut is never tried again
    seen = [tuple(choice) for choice, _ in measured]
    assert len(seen) == len(set(seen))
    # locally the smallest: cutting any layer one option deeper raises the loss above float
    for i, j in enumerate(found.choice):
        if j > 0:
            deeper = list(found.choice)
            deeper[i] = j - 1
            assert REFERENCE + sum(r[k] for r, k in zip(true, deeper, strict=True)) > REFERENCE


def test_compact_takes_the_cuts_predicted_cheapest_per_bit_first() -> None:
    # layer 0's first cut is predicted to cost 0.1 per bit, layer 1's 0.01: layer 1 goes first
    true = [[5.0, 0.0], [5.0, 0.0]]
    predicted = [[0.1, 0.0], [0.01, 0.0]]
    trial, measured = _synthetic(true, predicted)
    compact_search(trial, first_batch=1)
    assert [choice for choice, _ in measured[1:3]] == [[1, 0], [0, 1]]


def test_refinement_slack_is_searched_again() -> None:
    true = [[0.3, 0.1, 0.0], [0.3, 0.1, 0.0]]
    trial, _ = _synthetic(true, true, relief=0.15)
    found = compact_search(trial)
    # without refinement nothing is kept; each refinement buys one cut of 0.1 (and more)
    assert found.record["refined_rounds"] >= 2
    assert sum(found.choice) < 4
    assert found.record["calibration_loss"] <= REFERENCE


def test_compact_refuses_when_even_the_float_start_is_above_the_reference() -> None:
    trial, _ = _synthetic([[0.0, 0.5]], [[0.0, 0.0]])
    trial.limit = REFERENCE - 1
    with pytest.raises(BudgetError, match="keeps the calibration loss"):
        compact_search(trial)


def test_next_cut_ratio_floor_and_ties() -> None:
    cost = np.array([1.0, 2.0, 3.0, 4.0])
    damage = np.array([0.9, 0.2, 0.1, 0.0])
    assert next_cut(cost, damage, 3, -np.inf) == 2  # 0.1 per bit, the smallest ratio
    assert next_cut(cost, damage, 3, 2.0) == 2
    assert next_cut(cost, damage, 3, 3.0) is None  # nothing dearer than the floor is cheaper
    flat = np.array([0.75, 0.5, 0.25, 0.0])  # equal ratios: the smaller cut
    assert next_cut(cost, flat, 3, -np.inf) == 2
    assert next_cut(cost, damage, 0, -np.inf) is None


def test_compact_through_compress_keeps_the_measured_loss_and_is_deterministic(digits) -> None:
    """Every loss the search measured and kept is within the float loss, and the model it
    returns is the one it measured last."""
    seen: list[float] = []

    def recording(trial: Trial):
        measure = trial.measure

        def recorded(model: nn.Module) -> float:
            seen.append(measure(model))
            return seen[-1]

        trial.measure = recorded
        return compact_search(trial)

    SEARCHES["compact-recording"] = Search("compact-recording", recording)
    try:
        base = get_method("lowrank-compact")
        method = Method(
            "compact-test",
            "",
            base.grid,
            base.error_model,
            refine="lowrank-joint",
            search="compact-recording",
        )
        result = compress(
            create_model("test-cnn"), digits, method, Budget("lossless"), progress=False
        )
        again = compress(
            create_model("test-cnn"), digits, method, Budget("lossless"), progress=False
        )
    finally:
        del SEARCHES["compact-recording"]
    record = result.plan.metadata["lossless"]
    reference = record["float_calibration_loss"]
    assert mean_loss(result.model, digits) == pytest.approx(record["calibration_loss"], abs=1e-7)
    assert record["calibration_loss"] <= reference
    assert all(loss <= reference for _, loss, kept in record["history"] if kept)
    assert result.plan.ratio > 1
    assert again.plan.dumps() == result.plan.dumps()
    first, second = result.model.state_dict(), again.model.state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
