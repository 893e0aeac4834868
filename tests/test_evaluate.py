"""Evaluation (cifar_cnn.evaluate): test-time augmentation against views built by hand, logits through the one
normalization, and `evaluate_checkpoint`'s typed result on the run's own recorded data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_cnn import load_checkpoint, model_from_checkpoint, resolve_config, train
from cifar_cnn.data import load_dataset, make_splits
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.evaluate import EvalResult, evaluate_checkpoint, predict_logits, tta_logits


class Probe(nn.Module):
    """A model whose logits depend on position and on left/right: a mirrored or shifted view changes them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_tta_modes_against_views_built_by_hand() -> None:
    model = Probe()
    x = torch.randn(5, 3, 8, 8)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left = padded[..., 2:10, 2:10]  # the image moved by (-1, -1): content from one pixel down-right
    down_right = padded[..., 0:8, 0:8]

    def both(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(v) + model(v.flip(3)))

    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, "none"), model(x))
        assert torch.allclose(tta_logits(model, x, "flip"), both(x), atol=1e-6)
        want = 0.5 * both(x) + 0.25 * both(up_left) + 0.25 * both(down_right)
        assert torch.allclose(tta_logits(model, x, "flip-translate"), want, atol=1e-6)
        assert not torch.allclose(tta_logits(model, x, "flip"), model(x), atol=1e-3)
    with pytest.raises(CifarCnnError, match="--tta must be one of none, flip, flip-translate"):
        tta_logits(model, x, "mirror")


def test_predict_logits_normalizes_with_the_checkpoints_statistics() -> None:
    model = Probe()
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 8, 8), dtype=np.uint8)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    by_hand = (torch.from_numpy(images).double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        want = model(by_hand.float())
    got = predict_logits(model, images, mean, std, batch_size=3)
    assert got.shape == (7, 4) and torch.allclose(got, want, atol=1e-4)


def test_evaluate_checkpoint_result_on_the_runs_own_data(tmp_path: Path, official_dir: Path) -> None:
    config = resolve_config("seed", None, dict(epochs=1, batch_size=50, device="cpu", precision="fp32"))
    train(config, str(official_dir), tmp_path / "run", log=lambda _: None, threads=1)
    best = tmp_path / "run" / "best.pt"
    result = evaluate_checkpoint(
        best, split="val", device="cpu", precision="fp32", log=lambda _: None, with_logits=True
    )
    assert isinstance(result, EvalResult) and result["split"] == "val" and result.accuracy == result.metrics["accuracy"]
    # independently: the validation split rebuilt by hand, the model run by hand
    ckpt = load_checkpoint(best)
    splits = make_splits(load_dataset(str(official_dir), log=lambda _: None), 0.2, 0)
    model = model_from_checkpoint(ckpt)
    x = (torch.from_numpy(splits.val_images).float() / 255 - 0.5) / 0.5  # the seed recipe's mean and std
    with torch.no_grad():
        logits = model(x)
    assert result.logits is not None and torch.allclose(result.logits, logits, atol=1e-4)
    assert np.array_equal(result.labels, splits.val_labels) and result.images.shape == splits.val_images.shape
    assert result.metrics["num_images"] == len(splits.val_labels)
    expected = float((logits.argmax(1).numpy() == splits.val_labels).mean())
    assert result.accuracy == pytest.approx(expected)
    assert np.allclose(result.probabilities().sum(1), 1)
    plain = evaluate_checkpoint(best, split="val", device="cpu", precision="fp32", log=lambda _: None)
    assert plain.logits is None and plain.metrics == result.metrics
