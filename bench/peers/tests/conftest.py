import pytest
from torch import nn

from allot.zoo import create_model, get_dataset
from allot.zoo.data import Dataset


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """The tiny Linear-only zoo model (Linear 64->32, Linear 32->10) the linear peers run on."""
    return create_model("test-mlp")


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return get_dataset("digits", calibration_size=32, seed=0)
