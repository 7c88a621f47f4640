"""Shared fixtures: tiny registered zoo models and their data, float64 helpers."""

from __future__ import annotations

import pytest
import torch

from allot import Budget, Policy, compress, save
from allot.zoo import create_model, get_dataset


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep the profile cache of CLI runs out of the user's home: one fresh directory per test."""
    monkeypatch.setenv("ALLOT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def digits():
    """The digits data set (128 calibration samples) under the data contract."""
    return get_dataset("digits", calibration_size=128, seed=0).to_data()


@pytest.fixture
def test_cnn():
    return create_model("test-cnn")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, digits):
    """A test-cnn artifact whose last layer is quantized + sparse (a Sum with a sparse part), so
    every module kind and a composite are in it (the fuzz and hostile-input suites forge it)."""
    result = compress(
        create_model("test-cnn"),
        digits,
        "uniform-quant",
        Budget("bits", 4),
        policy=Policy.parse(pins=["5=quant:2+sparse:0.05"]),
        model_name="test-cnn",
        progress=False,
    )
    return save(result.model, result.plan, tmp_path_factory.mktemp("artifact") / "a")
