"""The benchmark zoo: offline data sets and registered models (importing it registers them)."""

from allot.zoo.data import DATASETS, Dataset, Split, get_dataset
from allot.zoo.registry import MODELS, ZooModel, create_model, get_entry, register_model

__all__ = [
    "DATASETS",
    "MODELS",
    "Dataset",
    "Split",
    "ZooModel",
    "create_model",
    "get_dataset",
    "get_entry",
    "register_model",
]
