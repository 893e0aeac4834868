"""Preprocessing presets of a run, resolved in one place (as torchvision's presets are): the side images are resized
to and the normalization statistics, from the config, the model's registry entry and, for one's own data, the
training images themselves. Data loading, the engine, evaluation, tune and bench all ask here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import TrainConfig
from .data import CIFAR10_CLASSES
from .errors import CifarCnnError
from .models import family_of, model_info
from .recipes import RECIPES


def resolve_input_size(config: TrainConfig, record: dict[str, Any] | None = None) -> int:
    """The side images are resized to: config.image_size, or the model's own input size when it is 0. `record`: a
    checkpoint's record of an hf: model (so a resumed run needs none of its files)."""
    info = model_info(config.model, record)
    size = config.image_size or info.input_size
    if size != info.input_size and not info.any_input_size:
        raise CifarCnnError(
            f"model {config.model!r} takes only {info.input_size}x{info.input_size} images, not image_size {size}: "
            f"use image_size {info.input_size} (or 0), or a model that takes any size, such as resnet18"
        )
    return size


STATS_SAMPLE = 20_000


def _spread(n: int) -> np.ndarray:
    return np.arange(n) if n <= STATS_SAMPLE else np.linspace(0, n - 1, STATS_SAMPLE).round().astype(np.int64)


def channel_stats(images: Any, chunk_bytes: int = 64 << 20) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), as fractions of 255 (float64 sums).
    An array or tensor is read whole; a larger set read from disk (an ImageSet) by `STATS_SAMPLE` evenly spaced
    images, as the model sees them."""
    x = images if isinstance(images, (np.ndarray, torch.Tensor)) else images.take(_spread(len(images)))
    channels = 3
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    chunk = max(1, chunk_bytes // (8 * 3 * int(x.shape[-1]) * int(x.shape[-2])))  # float64 copies stay ~64 MB
    for i in range(0, len(x), chunk):
        part = torch.as_tensor(x[i : i + chunk]).to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += (part * part).sum(dim=(0, 2, 3))
    count = max(1, len(x) * x.shape[2] * x.shape[3])
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def resolve_normalization(
    config: TrainConfig, classes: list[str], train_images: Any, record: dict[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from) for a run, following config.normalize (see its help)."""
    info = model_info(config.model, record)
    preset = RECIPES[config.recipe].values if config.recipe in RECIPES else {}
    given = (config.mean, config.std)
    # set in a config file or on the command line (a recipe's mean/std is its default for CIFAR-10, not a choice)
    explicit = given != (None, None) and given != (preset.get("mean"), preset.get("std"))
    own_classes = tuple(classes) != tuple(CIFAR10_CLASSES)
    pretrained = family_of(config.model) is not None  # keeps the statistics it was trained with (hf: models)
    if config.normalize == "dataset" or (
        config.normalize == "auto" and not explicit and own_classes and not pretrained
    ):
        if len(train_images) == 0:
            raise CifarCnnError("normalize dataset: no training images to compute the statistics from")
        mean, std = channel_stats(train_images)
        return mean, std, "dataset"
    source = "config" if given != (None, None) else "model"
    return tuple(config.mean or info.mean), tuple(config.std or info.std), source
