"""Evaluation: logits for a split (with optional test-time augmentation) and the metrics computed from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.pipeline import to_tensor
from .device import autocast
from .metrics import classification_metrics

TTA_MODES = ("none", "flip", "flip-translate")


def _flip_avg(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x).float() + model(x.flip(3)).float())


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) pixels, borders filled by reflection."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def tta_logits(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits averaged over views: 'flip' = image and its mirror; 'flip-translate' adds the image shifted one pixel
    up-left and one pixel down-right (each with its mirror), weighted 1/2, 1/4, 1/4 as in airbench."""
    if mode == "none":
        return model(x).float()
    if mode == "flip":
        return _flip_avg(model, x)
    if mode == "flip-translate":
        return (
            0.5 * _flip_avg(model, x)
            + 0.25 * _flip_avg(model, _shift(x, -1, -1))
            + 0.25 * _flip_avg(model, _shift(x, 1, 1))
        )
    raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 1000,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    tta: str = "none",
    channels_last: bool = False,
) -> torch.Tensor:
    """Float32 logits (N, classes) on the CPU for uint8 images (N, 3, H, W), normalized a batch at a time."""
    src = to_tensor(images)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(src), batch_size):
            x = (src[i : i + batch_size].to(device, non_blocking=True).float() - m) / s
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out.append(tta_logits(model, x, tta).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    classes: list[str],
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1000,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    tta: str = "none",
    channels_last: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on a split: accuracy, top5_accuracy, loss, per-class accuracy and F1, confusion matrix."""
    logits = predict_logits(
        model,
        images,
        mean,
        std,
        batch_size=batch_size,
        device=device,
        precision=precision,
        tta=tta,
        channels_last=channels_last,
    )
    result = classification_metrics(
        logits, to_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels, classes
    )
    result["tta"] = tta
    return result
