"""Every registered method, on tiny models of every layer kind, under a size budget."""

import pytest
import torch

from allot import Budget, Refinement, compress
from allot.methods import METHODS
from allot.zoo import create_model, get_dataset, get_entry

QUICK = {"lc": {"steps": 1}}
"""Shorter settings of refiners that train, to keep this suite fast (their own tests go longer)."""


@pytest.mark.parametrize("model_name", ["test-mlp", "test-conv1d"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_meets_the_budget_with_its_own_grid(method: str, model_name: str) -> None:
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=64)
    recipe = METHODS[method]
    result = compress(
        create_model(model_name),
        dataset,
        method,
        Budget("ratio", 3.0),
        refinement=Refinement.of(recipe, **QUICK.get(recipe.refine or "", {})),
        model_name=model_name,
        progress=False,
    )
    plan = result.plan
    assert plan.ratio >= 3.0
    for layer, row in zip(plan.layers, result.table.candidates, strict=True):
        assert layer.scheme in {c.scheme for c in row}
    outputs = result.model(dataset.example_inputs(4))
    assert torch.isfinite(outputs).all()
