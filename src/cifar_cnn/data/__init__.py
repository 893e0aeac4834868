"""Data: sources (official batches, image folders, archives, download), decode cache, splits, tensor pipeline."""

from .load import DEFAULT_SOURCE, Splits, data_home, load_dataset, make_splits
from .sources import CIFAR10_CLASSES, Dataset

__all__ = ["CIFAR10_CLASSES", "DEFAULT_SOURCE", "Dataset", "Splits", "data_home", "load_dataset", "make_splits"]
