"""Validation split and subsets: stratified, fixed by the seed, independent of the data's form."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_cnn.data import make_splits
from cifar_cnn.data.split import stratified_split, stratified_subset
from cifar_cnn.errors import CifarCnnError


def test_split_is_stratified_disjoint_and_complete() -> None:
    labels = np.repeat(np.arange(10), 500)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(val) == 1000 and len(train) == 4000
    assert np.bincount(labels[val]).tolist() == [100] * 10
    assert set(train).isdisjoint(val) and len(set(train) | set(val)) == len(labels)


def test_split_fixed_by_seed() -> None:
    labels = np.repeat(np.arange(10), 100)
    a = stratified_split(labels, 0.2, seed=3)[1]
    b = stratified_split(labels, 0.2, seed=3)[1]
    c = stratified_split(labels, 0.2, seed=4)[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_same_images_held_out_from_official_batches_and_image_folder(tmp_path, tiny_arrays) -> None:
    """Official batches interleave classes, image folders sort them: the same images must be held out."""
    from cifar_cnn.data import load_dataset

    from .conftest import write_official_batches
    from .data_writers import write_image_folder

    a = tiny_arrays
    official = load_dataset(
        str(write_official_batches(tmp_path / "o", a["train_x"], a["train_y"], a["test_x"], a["test_y"])), log=print
    )
    folder = load_dataset(str(write_image_folder(official, tmp_path / "f")), log=print)
    for seed in (0, 1):
        s1, s2 = make_splits(official, 0.2, seed, subset=300), make_splits(folder, 0.2, seed, subset=300)
        assert np.array_equal(s1.val_images, s2.val_images) and np.array_equal(s1.train_images, s2.train_images)
    # and the held-out images are, per class, the k-th images of that class in the original interleaved order
    s = make_splits(official, 0.2, 0)
    _, val_idx = stratified_split(np.sort(a["train_y"]), 0.2, 0)
    first_class = a["train_x"][a["train_y"] == 0]
    k = val_idx[val_idx < 60]
    assert np.array_equal(s.val_images[: len(k)], first_class[k])


def test_subset_proportions_and_seed() -> None:
    labels = np.concatenate([np.zeros(600, int), np.ones(300, int), np.full(100, 2)])
    idx = stratified_subset(labels, 100, seed=1)
    assert len(idx) == 100 and np.bincount(labels[idx]).tolist() == [60, 30, 10]
    assert np.array_equal(idx, stratified_subset(labels, 100, seed=1))
    with pytest.raises(CifarCnnError, match="--subset"):
        stratified_subset(labels, 5000, seed=1)


def test_val_split_zero_trains_on_everything() -> None:
    labels = np.repeat(np.arange(3), 10)
    train, val = stratified_split(labels, 0.0, seed=0)
    assert len(train) == 30 and len(val) == 0


def test_training_subset_is_exact_for_subset_and_a_cap_for_max_train_images() -> None:
    from cifar_cnn.data import training_subset

    assert training_subset(300, 0, 600) == 300 and training_subset(300, 100, 600) == 300  # subset wins
    assert training_subset(0, 100, 600) == 100  # a cap below the images
    assert training_subset(0, 25000, 600) is None and training_subset(0, 600, 600) is None  # all of them
    assert training_subset(0, 0, 600) is None
