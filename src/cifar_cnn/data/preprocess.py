"""Pixel normalization, the one formula every path uses: training, evaluation, prediction (PyTorch and onnxruntime)
and the export parity check. Torch-free, so `predict --onnx` runs without torch; a torch tensor in gives a tensor out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def scaled_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """mean and std of 0..1 pixels as float32 (1, C, 1, 1) arrays on the 0..255 scale of uint8 images."""
    m = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(1, -1, 1, 1)
    s = (np.asarray(std, dtype=np.float32) * np.float32(255.0)).reshape(1, -1, 1, 1)
    return m, s


def normalize(images: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 images (N, C, H, W) -> float32 (x - 255 mean) / (255 std), i.e. (x / 255 - mean) / std.

    `images` is a numpy array (a float32 array comes back) or a torch tensor on any device (a float32 tensor on that
    device comes back); both compute in the same float32 steps, so every backend sees the same inputs bit for bit.
    """
    m, s = scaled_stats(mean, std)
    if isinstance(images, np.ndarray):
        return (images.astype(np.float32) - m) / s
    x = images.float()
    return (x - x.new_tensor(m)) / x.new_tensor(s)


def denormalize(x: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """The inverse of `normalize`: normalized images -> uint8 pixels (rounded, clipped), for showing what a model sees.
    A torch tensor (any float dtype, any device) gives a uint8 tensor on the CPU; a numpy array gives a uint8 array."""
    m, s = scaled_stats(mean, std)
    if isinstance(x, np.ndarray):
        return np.clip(np.rint(x.astype(np.float32) * s + m), 0, 255).astype(np.uint8)
    x = x.detach().float().cpu()
    return (x * x.new_tensor(s) + x.new_tensor(m)).round().clamp(0, 255).byte()
