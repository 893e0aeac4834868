"""Stratified, seeded index selection: the validation split and training subsets.

Selection is made per class on the position of an image *within its class*, so the same images are chosen whether
CIFAR-10 comes as the official batches or as the image-folder copy (the within-class order is the same in both).
"""

from __future__ import annotations

import numpy as np

from ..errors import CifarCnnError


def _class_positions(labels: np.ndarray) -> dict[int, np.ndarray]:
    """For each class, the indices of its images in data order (= within-class order)."""
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def _class_rng(seed: int, cls: int, purpose: int) -> np.random.Generator:
    # One stream per (seed, class, purpose): choices for one class never depend on the others.
    return np.random.default_rng([seed, cls, purpose])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, validation): round(fraction * n_c) images of each class c held out."""
    if not 0.0 <= fraction < 1.0:
        raise CifarCnnError(f"--val-split must be in [0, 1), got {fraction}")
    train, val = [], []
    for cls, idx in _class_positions(labels).items():
        n_val = int(round(fraction * len(idx)))
        if fraction > 0 and n_val == 0:
            n_val = 1 if len(idx) > 1 else 0
        chosen = np.zeros(len(idx), dtype=bool)
        chosen[_class_rng(seed, cls, 1).permutation(len(idx))[:n_val]] = True
        val.append(idx[chosen])
        train.append(idx[~chosen])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_subset(labels: np.ndarray, n: int, seed: int, purpose: int = 2) -> np.ndarray:
    """Indices of `n` images with class proportions kept (largest-remainder rounding), chosen by the seed (`purpose`
    keeps choices made for different ends independent: 2 = --subset, 3 = the calibration slice)."""
    total = len(labels)
    if not 0 < n <= total:
        raise CifarCnnError(f"--subset must be between 1 and the {total} training images, got {n}")
    groups = _class_positions(labels)
    counts = np.array([len(v) for v in groups.values()], dtype=np.float64)
    share = counts * n / total
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    out = [
        idx[np.sort(_class_rng(seed, cls, purpose).permutation(len(idx))[:k])]
        for (cls, idx), k in zip(groups.items(), take)
    ]
    return np.sort(np.concatenate(out))
