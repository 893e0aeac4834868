"""Prediction with an exported ONNX model through onnxruntime, without torch.

This module imports only numpy, Pillow and onnxruntime (and torch-free parts of cifar_cnn), so `cifar-cnn predict
--onnx FILE` runs on a machine where torch is not installed. The class names, normalization and input size come from
the metadata `cifar-cnn export` stores in the ONNX file, or from the FILE.json written beside it; so does the softmax
temperature (the model returns raw logits; probabilities are softmax(logits / temperature), 1.0 when absent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import check_temperature
from .data.preprocess import normalize
from .errors import CifarCnnError
from .predict_core import DEFAULT_BATCH_SIZE, BasePredictor

METADATA_KEY = "cifar_cnn"  # key of the JSON metadata in the ONNX model's metadata_props


def read_metadata(path: Path, stored: dict[str, str]) -> dict[str, Any]:
    """The model's classes, mean, std and input size: from the ONNX metadata, else from PATH.json beside it."""
    if METADATA_KEY in stored:
        return json.loads(stored[METADATA_KEY])
    sidecar = Path(f"{path}.json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise CifarCnnError(f"{sidecar}: unreadable export metadata ({exc})") from None
    raise CifarCnnError(
        f"{path}: no cifar-cnn metadata in the model and no {sidecar.name} beside it; export it with `cifar-cnn export`"
    )


class OnnxPredictor(BasePredictor):
    """An ONNX model (dynamic batch, input uint8 images normalized here) behind the same API as `Predictor`.
    Exported models run without test-time augmentation."""

    tta = "none"
    backend = "onnxruntime"

    def __init__(self, path: str | Path, *, batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CifarCnnError(
                "--onnx needs onnxruntime; install it with `pip install onnxruntime` (or the [export] extra)"
            ) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise CifarCnnError(f"{self.path}: no such ONNX file")
        if batch_size < 1:
            raise CifarCnnError(f"--batch-size must be at least 1, got {batch_size}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for damaged or foreign files
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CifarCnnError(f"{self.path}: not a loadable ONNX model ({first})") from None
        meta = read_metadata(self.path, dict(self.session.get_modelmeta().custom_metadata_map))
        try:
            self.classes = [str(c) for c in meta["classes"]]
            self.mean = tuple(float(v) for v in meta["mean"])
            self.std = tuple(float(v) for v in meta["std"])
            self.input_size = int(meta["input_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CifarCnnError(f"{self.path}: export metadata lacks or garbles {exc}") from None
        self.temperature = check_temperature(meta.get("temperature", 1.0), str(self.path))
        self.name = str(meta.get("model", self.path.stem))
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = batch_size

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Float32 logits (N, classes) for uint8 images (N, 3, S, S), normalized as in evaluation."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = normalize(images[i : i + self.batch_size], self.mean, self.std)
            out.append(self.session.run(None, {self.input_name: x})[0].astype(np.float32))
        return np.concatenate(out) if out else np.empty((0, len(self.classes)), np.float32)
