"""Plan predictions against measurement, and the geometry split against exact eigenvectors."""

import numpy as np
import pytest
import torch
from hessians import blocks, exact, pairs, setup

from allot import Budget, compress
from allot.discover import discover
from allot.evaluate import metrics
from allot.prediction import geometry, plan_deltas
from allot.profile.engine import Profile, Settings
from allot.profile.measure import mean_loss
from allot.zoo import create_model


@pytest.fixture(scope="module")
def cet_result(digits):
    model = create_model("test-cnn")
    return model, compress(model, digits, "cet", Budget("ratio", 8), progress=False)


def test_a_curvature_plan_carries_its_checked_prediction(cet_result, digits) -> None:
    model, result = cet_result
    prediction = result.plan.metadata["prediction"]
    # cet allocates on 1/2 d_i'H_ii d_i; the prediction adds the gradient term to their sum.
    quadratic_sum = prediction["per_layer"] - prediction["linear"]
    assert quadratic_sum == pytest.approx(result.plan.damage, rel=1e-6, abs=1e-9)
    work = result.profile.model
    measured = mean_loss(result.model, digits) - mean_loss(work, digits)
    assert prediction["measured_calibration"] == pytest.approx(measured, rel=1e-9)
    held_out = metrics(result.model, digits)["loss"] - metrics(model, digits)["loss"]
    assert prediction["measured_held_out"] == pytest.approx(held_out, rel=1e-5, abs=1e-9)
    # The joint prediction adds the cross-layer terms of one full Hessian-vector product.
    deltas = plan_deltas(work, result.model, result.plan)
    hv = result.profile.curvature.hvp(deltas)
    quadratic = 0.5 * sum(float((hv[n].double() * d.double()).sum()) for n, d in deltas.items())
    assert prediction["joint"] == pytest.approx(prediction["linear"] + quadratic, rel=1e-6)


def test_a_curvature_plan_carries_its_geometry_and_pareto_curve(cet_result) -> None:
    _, result = cet_result
    plan = result.plan
    changed = {layer.name for layer in plan.layers if layer.scheme.label() != "keep"}
    assert set(plan.metadata["geometry"]) == changed
    for split in plan.metadata["geometry"].values():
        assert 0 <= split["top_error_share"] <= 1 and split["negative_curvature"] <= 0
    bits, damage = np.array(plan.metadata["pareto"]).T
    assert (np.diff(bits) > 0).all() and (np.diff(damage) <= 1e-12).all()
    assert bits[0] <= plan.weight_bits / plan.n_weights <= bits[-1]


def test_methods_without_curvature_skip_the_check(digits) -> None:
    result = compress(
        create_model("test-cnn"), digits, "weight-error-quant", Budget("ratio", 8), progress=False
    )
    assert "prediction" not in result.plan.metadata and "pareto" in result.plan.metadata


def test_geometry_matches_the_exact_eigendecomposition() -> None:
    model, names, batches = setup("mlp")
    layers = [layer for layer in discover(model).layers if layer.name in names]
    settings = Settings(lanczos_iterations=30, eigenpairs=3)
    profile = Profile(model, layers, pairs(batches), settings=settings, progress=False)
    _, hessian = exact(model, names, batches)
    generator = torch.Generator().manual_seed(0)
    deltas = {
        name: torch.randn(model.get_submodule(name).weight.shape, generator=generator).double()
        for name in names
    }
    split = geometry(profile, deltas)
    for name, block in zip(names, blocks(model, names), strict=True):
        values, vectors = np.linalg.eigh(hessian[block, block].numpy())
        d = deltas[name].flatten().numpy()
        projections = vectors.T @ d
        top = [i for i in np.argsort(values)[::-1][:3] if values[i] > 0]
        negative = [i for i in np.argsort(values)[:3] if values[i] < 0]
        expected_share = (values[top] * projections[top] ** 2).sum() / (
            d @ hessian[block, block].numpy() @ d
        )
        assert split[name].eigenvectors == len(top)
        assert split[name].top_error_share == pytest.approx(
            (projections[top] ** 2).sum() / (d @ d), rel=1e-6
        )
        assert split[name].top_curvature_share == pytest.approx(expected_share, rel=1e-6)
        expected_negative = 0.5 * (values[negative] * projections[negative] ** 2).sum()
        assert split[name].negative_curvature == pytest.approx(
            expected_negative, rel=1e-6, abs=1e-12
        )
        # layer 0 sits at a saddle (min eigenvalue about -0.1); layer 3's block is semidefinite
        # and its smallest eigenvalue zero up to rounding (+-1e-17): no saddle, on any machine
        assert split[name].saddle == bool(values.min() < -1e-6 * abs(values).max())
    assert [split[name].saddle for name in names] == [True, False]
