"""Data: sources (official batches, image folders, archives, download), decode cache, splits, tensor pipeline."""

from .load import (
    DEFAULT_SOURCE,
    DataSource,
    Splits,
    check_same_data,
    data_home,
    load_dataset,
    make_splits,
    training_subset,
)
from .sources import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, Dataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_SOURCE",
    "DataSource",
    "Dataset",
    "Splits",
    "check_same_data",
    "data_home",
    "load_dataset",
    "make_splits",
    "training_subset",
]
