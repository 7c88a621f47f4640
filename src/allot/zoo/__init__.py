"""The benchmark zoo: offline data sets and registered models (importing it registers them)."""

from allot.zoo import datasets, minilm, models  # noqa: F401  (registers the data sets and models)
from allot.zoo.data import DATASETS, Dataset, Split, get_dataset
from allot.zoo.registry import MODELS, ZooModel, create_model, get_entry, register_model
from allot.zoo.tasks import ClassificationTask

__all__ = [
    "DATASETS",
    "MODELS",
    "ClassificationTask",
    "Dataset",
    "Split",
    "ZooModel",
    "create_model",
    "get_dataset",
    "get_entry",
    "register_model",
]
