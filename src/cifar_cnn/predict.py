"""Predictor: a checkpoint -> the evaluation preprocessing -> top-k labels with probabilities.

    from cifar_cnn.predict import Predictor
    p = Predictor.from_checkpoint("runs/a/best.pt")
    p.predict_files(["photos/"], top_k=3)          # files and folders, unreadable files listed as errors
    p.predict(images)                               # uint8 (N, 3, 32, 32) arrays, already preprocessed

The command line (`cifar-cnn predict`) and the HTTP server (`cifar-cnn serve`) both use this class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import checkpoint_temperature, load_checkpoint, model_from_checkpoint
from .choices import TTA_MODES, check_choice
from .device import resolve_device, set_threads
from .errors import CifarCnnError
from .evaluate import predict_logits
from .predict_core import DEFAULT_BATCH_SIZE, BasePredictor, PredictionReport

__all__ = ["Predictor", "PredictionReport"]


class Predictor(BasePredictor):
    """A model in eval mode with the classes, normalization, input size and test-time augmentation it was trained
    with. `logits()` is thread-safe for one caller at a time (the server runs it from a single worker thread)."""

    backend = "pytorch"

    def __init__(
        self,
        model: nn.Module,
        classes: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        *,
        tta: str = "none",
        device: torch.device | str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str = "model",
        temperature: float = 1.0,
    ) -> None:
        check_choice(tta, TTA_MODES, "--tta")
        if batch_size < 1:
            raise CifarCnnError(f"--batch-size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = int(input_size)
        self.tta = tta
        self.batch_size = batch_size
        self.name = name
        self.temperature = float(temperature)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        tta: str | None = None,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
    ) -> Predictor:
        """Load a checkpoint written by `train`; `tta=None` uses the checkpoint's own test-time augmentation."""
        set_threads(threads)
        ckpt = load_checkpoint(path)
        mode = tta or ckpt.get("tta", "none")
        return cls(
            model_from_checkpoint(ckpt, path),
            list(ckpt["classes"]),
            tuple(ckpt["mean"]),
            tuple(ckpt["std"]),
            int(ckpt["input_size"]),
            tta=mode,
            device=resolve_device(device),
            batch_size=batch_size,
            name=str(ckpt["model"]["name"]),
            temperature=checkpoint_temperature(ckpt, path, tta=mode),
        )

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Float32 logits (N, classes) in fp32, with this predictor's TTA, exactly as `evaluate` computes them."""
        out = predict_logits(
            self.model,
            images,
            self.mean,
            self.std,
            batch_size=self.batch_size,
            device=self.device,
            precision="fp32",
            tta=self.tta,
            size=self.input_size,  # images held smaller (a data set's split) are upscaled as evaluate does
        )
        return out.numpy()
