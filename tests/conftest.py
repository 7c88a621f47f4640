"""Shared fixtures: tiny registered zoo models and their data, float64 helpers."""

from __future__ import annotations

import pytest
import torch

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
