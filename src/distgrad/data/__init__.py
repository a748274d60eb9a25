"""Datasets and shards."""

from distgrad.data.mnist import Dataset, load_mnist
from distgrad.data.shards import SHARDINGS, make_shards

DATASETS = ("mnist",)


def load_dataset(name: str) -> Dataset:
    """Load a named dataset (only ``mnist`` ships with distgrad)."""
    from distgrad.errors import choose

    choose("dataset", name, DATASETS)
    return load_mnist()


__all__ = ["DATASETS", "SHARDINGS", "Dataset", "load_dataset", "load_mnist", "make_shards"]
