"""The teaching notebook's own loop (cifar_cnn.notebook_loop), bench's baseline: per-image tensors as torchvision's
ToTensor + Normalize make them, the notebook's split, and a test accuracy that the package's own evaluation of the
saved weights reproduces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cifar_cnn.data import load_dataset
from cifar_cnn.evaluate import predict_logits
from cifar_cnn.models import create_model
from cifar_cnn.notebook_loop import PerImageTensors, notebook_loop


def test_per_image_tensors_are_totensor_and_normalize() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 4, 5), dtype=np.uint8)
    ds = PerImageTensors(images, np.array([4, 1, 7]))
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (3, 4, 5) and y == 1 and isinstance(y, int)
    expected = (images[1].astype(np.float64) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_the_notebook_loop_learns_and_its_accuracy_is_its_saved_weights(tmp_path: Path, official_dir: Path) -> None:
    lines: list[str] = []
    r = notebook_loop(str(official_dir), tmp_path / "nb", seed=3, epochs=8, home=tmp_path / "home", log=lines.append)
    assert [h["epoch"] for h in r["history"]] == list(range(1, 9)) and len(lines) == 8 and r["wall_s"] > 0
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]  # it trains
    # the saved weights (lowest validation loss) scored by the package's own batched evaluation
    ds = load_dataset(str(official_dir), 32, home=tmp_path / "home", log=lambda m: None)
    model = create_model("seed_cnn", num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "nb" / "model_cifar.pt", weights_only=True))
    logits = predict_logits(model, ds.test_images, (0.5,) * 3, (0.5,) * 3, batch_size=50, device="cpu")
    expected = float((logits.argmax(1) == torch.from_numpy(ds.test_labels)).float().mean())
    # (batches of 20 against 50 may round a near-tie differently: at most one image apart)
    assert abs(r["accuracy"] - expected) <= 1 / len(ds.test_labels) and r["accuracy"] > 0.3  # above chance (0.1)
    best = min(r["history"], key=lambda h: h["val_loss"])
    assert best["val_loss"] <= r["history"][0]["val_loss"]
