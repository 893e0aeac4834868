"""Metrics against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cifar_cnn.metrics import classification_metrics, confusion_matrix


def test_metrics_by_hand() -> None:
    # 3 classes, 6 images. predictions (argmax): 0, 0, 1, 2, 2, 1 ; labels: 0, 1, 1, 2, 2, 2
    logits = torch.tensor([[3.0, 1, 0], [2, 1, 0], [0, 2, 1], [0, 1, 2], [1, 0, 3], [0, 2, 1]])
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 2 / 3})
    # precision a = 1/2, b = 1/2, c = 1 ; F1 = 2PR/(P+R)
    assert m["per_class_f1"]["a"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert m["per_class_f1"]["b"] == pytest.approx(0.5)
    assert m["per_class_f1"]["c"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    # top-2 would be the same as top-5 here: all 3 classes -> 1.0
    assert m["top5_accuracy"] == 1.0
    expected_loss = (
        sum(
            -math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))
            for row, t in zip(logits.tolist(), labels.tolist())
        )
        / 6
    )
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["num_images"] == 6 and m["classes"] == ["a", "b", "c"]


def test_class_without_images_is_null() -> None:
    m = classification_metrics(torch.tensor([[1.0, 0]]), torch.tensor([0]), ["x", "y"])
    assert m["per_class_accuracy"] == {"x": 1.0, "y": None}
    assert m["macro_f1"] == 1.0


def test_confusion_matrix_counts() -> None:
    cm = confusion_matrix(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0]), 2)
    assert cm.tolist() == [[1, 1], [1, 2]]
