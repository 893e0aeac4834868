"""Pixel normalization, the one formula of every path: numpy and torch give the same float32 values, equal to an
independent (x / 255 - mean) / std, and denormalize gives back the uint8 pixels exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar_cnn.data.preprocess import denormalize, normalize, scaled_stats
from cifar_cnn.data.sources import CIFAR10_MEAN, CIFAR10_STD

STATS = [
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the seed recipe: inputs in [-1, 1]
    (CIFAR10_MEAN, CIFAR10_STD),
    ((0.1, 0.6, 0.9), (0.2, 0.3, 0.45)),
]


def every_pixel_value() -> np.ndarray:
    """uint8 images (N, 3, H, W) holding every value 0..255 in every channel, plus random ones."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, 3, 16, 16))
    noise = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    return np.concatenate([ramp, noise])


@pytest.mark.parametrize(("mean", "std"), STATS)
def test_numpy_and_torch_agree_and_match_the_formula(mean: tuple, std: tuple) -> None:
    x = every_pixel_value()
    a = normalize(x, mean, std)
    t = normalize(torch.from_numpy(x), mean, std)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == x.shape
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == x.shape
    assert np.array_equal(a, t.numpy())  # bit for bit: every backend sees the same inputs
    m = np.array(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    s = np.array(std, dtype=np.float64).reshape(1, 3, 1, 1)
    reference = (x.astype(np.float64) / 255 - m) / s
    assert np.abs(a.astype(np.float64) - reference).max() <= 1e-6
    sm, ss = scaled_stats(mean, std)
    assert sm.shape == ss.shape == (1, 3, 1, 1) and sm.dtype == ss.dtype == np.float32
    assert np.allclose(sm, m * 255, rtol=1e-6) and np.allclose(ss, s * 255, rtol=1e-6)


@pytest.mark.parametrize(("mean", "std"), STATS)
def test_denormalize_inverts_normalize_exactly(mean: tuple, std: tuple) -> None:
    x = every_pixel_value()
    back = denormalize(normalize(x, mean, std), mean, std)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8 and np.array_equal(back, x)
    tback = denormalize(normalize(torch.from_numpy(x), mean, std), mean, std)
    assert isinstance(tback, torch.Tensor) and tback.dtype == torch.uint8 and torch.equal(tback, torch.from_numpy(x))
    # values beyond the pixel range are clipped, not wrapped
    far = np.full((1, 3, 2, 2), 1e3, dtype=np.float32)
    assert (denormalize(far, mean, std) == 255).all() and (denormalize(-far, mean, std) == 0).all()
