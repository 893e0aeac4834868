"""Classification metrics from logits: accuracy, top-5, per-class accuracy and F1, confusion matrix, loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """The metrics dict that `evaluate --json` prints and test_metrics.json holds (fractions in 0..1)."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    c = len(classes)
    n = len(labels)
    if n == 0:
        raise ValueError("no images to evaluate")
    preds = logits.argmax(1)
    cm = confusion_matrix(labels, preds, c)
    tp = cm.diag().double()
    support = cm.sum(1).double()
    predicted = cm.sum(0).double()
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.nan)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    denom = precision + torch.nan_to_num(recall)
    f1 = torch.where(denom > 0, 2 * precision * torch.nan_to_num(recall) / denom.clamp(min=1e-12), torch.zeros_like(tp))
    k = min(5, c)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean().item()

    def opt(v: float) -> float | None:
        return None if v != v else float(v)  # NaN (class with no images) -> null in JSON

    present = support > 0
    return {
        "accuracy": float((preds == labels).double().mean().item()),
        "top5_accuracy": float(top5),
        "loss": float(F.cross_entropy(logits, labels).item()),
        "num_images": int(n),
        "classes": list(classes),
        "per_class_accuracy": {name: opt(recall[i].item()) for i, name in enumerate(classes)},
        "per_class_precision": {name: float(precision[i].item()) for i, name in enumerate(classes)},
        "per_class_f1": {name: float(f1[i].item()) for i, name in enumerate(classes)},
        "macro_f1": float(f1[present].mean().item()) if present.any() else 0.0,
        "confusion_matrix": cm.tolist(),
    }
