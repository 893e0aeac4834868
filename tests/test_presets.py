"""Presets a run derives from its config and data: per-channel statistics (against numpy), which normalization a
run uses, and the input size a model takes."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_cnn import resolve_config
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.presets import channel_stats, resolve_input_size, resolve_normalization

from .conftest import CLASSES, make_images


def test_channel_stats_match_numpy() -> None:
    x, _ = make_images(7, num_classes=3, size=12, seed=4)
    mean, std = channel_stats(x, chunk_bytes=5 * 3 * 12 * 12 * 8)  # 5 images a chunk: several chunks
    ref = x.astype(np.float64) / 255
    assert mean == pytest.approx(tuple(ref.mean(axis=(0, 2, 3))), abs=1e-6)
    assert std == pytest.approx(tuple(ref.std(axis=(0, 2, 3))), abs=1e-6)


def test_which_normalization_a_run_uses() -> None:
    x, _ = make_images(4, num_classes=2, size=8)
    stats = channel_stats(x)
    resnet = resolve_config(None, None, {"model": "resnet18", "mean": None, "std": None})
    assert resolve_normalization(resnet, ["a", "b"], x) == (*stats, "dataset")  # own classes: the data's
    assert resolve_normalization(resnet, CLASSES, x)[2] == "model"  # CIFAR-10: the model's (CIFAR-10 statistics)
    seed = resolve_config("seed")  # the recipe's mean/std (0.5: inputs in [-1, 1]) are its CIFAR-10 default
    assert resolve_normalization(seed, ["a", "b"], x) == (*stats, "dataset")
    assert resolve_normalization(seed, CLASSES, x) == ((0.5,) * 3, (0.5,) * 3, "config")
    chosen = resolve_config("seed", None, {"mean": [0.4] * 3})  # set by the user: kept
    assert resolve_normalization(chosen, ["a", "b"], x) == ((0.4,) * 3, (0.5,) * 3, "config")
    forced = resolve_config("seed", None, {"normalize": "dataset"})
    assert resolve_normalization(forced, CLASSES, x) == (*stats, "dataset")
    assert resolve_normalization(resolve_config("seed", None, {"normalize": "model"}), ["a"], x)[2] == "config"


def test_input_size_follows_the_model() -> None:
    assert resolve_input_size(resolve_config(None, None, {"model": "resnet18", "image_size": 48})) == 48
    assert resolve_input_size(resolve_config("seed")) == 32
    with pytest.raises(CifarCnnError, match="takes only 32x32"):
        resolve_input_size(resolve_config("seed", None, {"image_size": 48}))
