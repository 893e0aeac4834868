"""What every predictor shares, without torch: finding image files, decoding them in batches, softmax and top-k,
and the result rows that `predict --json` and `--csv` write.

File names in every row, line and message are `cifar_cnn.names.shown(path)`: bytes that are not UTF-8 and control
characters as `\\xNN`, so the same name reads the same in the terminal, the JSON, the CSV and the server's answers.
An image whose logits or probabilities are not finite (a model whose weights overflow) is an error for that image,
never a NaN in the output.

`cifar_cnn.predict.Predictor` (PyTorch) and `cifar_cnn.onnx_predict.OnnxPredictor` (onnxruntime) differ only in
how they turn a batch of uint8 images into logits; everything else lives here, so both give the same answers in
the same form.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .calibration import softmax
from .data.images import decode_image, image_extensions, read_capped
from .errors import CifarCnnError
from .names import shown

DEFAULT_BATCH_SIZE = 256


NON_FINITE = (
    "the model produced non-finite outputs (NaN or infinity); its weights overflow or are damaged: retrain or "
    "re-export it"
)


class NonFiniteOutput(CifarCnnError):
    """The model's logits or probabilities for an image are NaN or infinite (see NON_FINITE)."""


def finite_probabilities(logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(softmax(logits / temperature), a bool per image: whether its logits and probabilities are all finite)."""
    logits = np.asarray(logits)
    with np.errstate(all="ignore"):  # overflowing logits are reported per image, not as numpy warnings
        probs = softmax(logits, temperature)
    return probs, np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1)


def top_k_rows(logits: np.ndarray, classes: Sequence[str], k: int, temperature: float = 1.0) -> list[dict[str, Any]]:
    """One dict per image: the top label, its probability, and the `k` most probable labels (best first), with
    probabilities softmax(logits / temperature) (see cifar_cnn.calibration). NonFiniteOutput when an image's
    logits or probabilities are not finite (`BasePredictor.predict_files` makes that an error of the file)."""
    if k < 1:
        raise CifarCnnError(f"--top-k must be at least 1, got {k}")
    k = min(k, len(classes))
    probs, finite = finite_probabilities(logits, temperature)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise NonFiniteOutput(f"image {bad + 1} of {len(finite)}: {NON_FINITE}" if len(finite) > 1 else NON_FINITE)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for p, idx in zip(probs, order):
        top = [{"label": shown(classes[i]), "probability": float(p[i])} for i in idx]  # names from folders
        rows.append({"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top})
    return rows


def as_batch(images: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """Check and stack preprocessed images into one uint8 (N, 3, size, size) array; a single (3, H, W) is allowed."""
    arr = np.stack([np.asarray(a) for a in images]) if isinstance(images, (list, tuple)) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (3, size, size) or arr.dtype != np.uint8:
        raise CifarCnnError(
            f"expected uint8 images of shape (N, 3, {size}, {size}), got {arr.dtype} {tuple(arr.shape)}; "
            "decode files with cifar_cnn.data.images.decode_image(data, size) or use predict_files()"
        )
    return np.ascontiguousarray(arr)


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files to predict: each named file as given, each folder searched recursively for files with an image
    extension Pillow knows (sorted). Returns (files, errors) where errors lists paths that do not exist."""
    exts = image_extensions()
    files: list[Path] = []
    errors: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                errors.append({"path": shown(p), "error": f"{shown(p)}: folder holds no image files"})
            files.extend(found)
        elif p.exists():  # a FIFO or a device is refused by name when read
            files.append(p)
        else:
            errors.append({"path": shown(p), "error": f"{shown(p)}: no such file or folder"})
    return files, errors


def _chunks(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@dataclass
class PredictionReport:
    """Predictions for the files that could be read, and one error per file (or path) that could not."""

    predictions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": self.predictions, "errors": self.errors}


class BasePredictor:
    """Preprocessing, batching and top-k around a `logits(uint8 batch) -> float32 (N, classes)` function.

    Subclasses set `classes`, `mean`, `std`, `input_size` (and `temperature`, when calibrated) and implement
    `logits`. Probabilities are softmax(logits / temperature).
    """

    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    batch_size: int = DEFAULT_BATCH_SIZE
    temperature: float = 1.0

    def logits(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Float32 logits (N, classes) for uint8 images (N, 3, input_size, input_size)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What /health and `--json` callers want to know about the model."""
        return {
            "model": getattr(self, "name", "model"),
            "classes": list(self.classes),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "tta": getattr(self, "tta", "none"),
            "backend": getattr(self, "backend", "unknown"),
            "temperature": self.temperature,
        }

    def rows(self, logits: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
        """Top-k rows (see `top_k_rows`) for logits this predictor computed, with its temperature."""
        return top_k_rows(logits, self.classes, top_k, self.temperature)

    def predict(self, images: np.ndarray | Sequence[np.ndarray], top_k: int = 5) -> list[dict[str, Any]]:
        """Top-k labels and probabilities for preprocessed uint8 images (see `decode`), in batches."""
        batch = as_batch(images, self.input_size)
        out: list[dict[str, Any]] = []
        for i in range(0, len(batch), self.batch_size):
            out.extend(self.rows(self.logits(batch[i : i + self.batch_size]), top_k))
        return out

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes), float64, as predict reports them (softmax of logits / temperature)."""
        batch = as_batch(images, self.input_size)
        return (
            np.concatenate(
                [
                    softmax(self.logits(batch[i : i + self.batch_size]), self.temperature)
                    for i in range(0, len(batch), self.batch_size)
                ]
            )
            if len(batch)
            else np.zeros((0, len(self.classes)))
        )

    def decode(self, data: bytes, name: str = "image") -> np.ndarray:
        """Encoded image bytes -> the (3, S, S) uint8 array the model takes (the evaluation preprocessing)."""
        return decode_image(data, self.input_size, name)

    def predict_bytes(self, data: bytes, name: str = "image", top_k: int = 5) -> dict[str, Any]:
        """Top-k for one encoded image (PNG, JPEG, ...); CifarCnnError if it cannot be decoded, NonFiniteOutput
        (naming it) if the model's outputs for it are not finite."""
        try:
            return self.predict(self.decode(data, name)[None], top_k)[0]
        except NonFiniteOutput:
            raise NonFiniteOutput(f"{shown(name)}: {NON_FINITE}") from None

    def predict_files(self, paths: Iterable[str | Path], top_k: int = 5) -> PredictionReport:
        """Predict files and folders (recursively); files that cannot be read or decoded, and files the model gives
        non-finite outputs for, become errors while the rest are predicted."""
        if top_k < 1:
            raise CifarCnnError(f"--top-k must be at least 1, got {top_k}")
        files, errors = find_images(paths)
        report = PredictionReport(errors=errors)
        for chunk in _chunks(files, self.batch_size):
            decoded, names = self.decode_files(chunk, report.errors)
            if decoded:
                self._predict_decoded(np.stack(decoded), names, top_k, report)
        return report

    def _predict_decoded(self, images: np.ndarray, names: list[str], top_k: int, report: PredictionReport) -> None:
        """Rows for one batch of decoded files into `report`: a prediction per image with finite outputs, an error
        per image without."""
        logits = self.logits(as_batch(images, self.input_size))
        _, finite = finite_probabilities(logits, self.temperature)
        rows = iter(self.rows(logits[finite], top_k) if finite.any() else [])
        for name, ok in zip(names, finite):
            if ok:
                report.predictions.append({"path": name, **next(rows)})
            else:
                report.errors.append({"path": name, "error": f"{name}: {NON_FINITE}"})

    def decode_files(self, files: Sequence[Path], errors: list[dict[str, str]]) -> tuple[list[np.ndarray], list[str]]:
        """Decode files as predict does: (images, their paths as predict prints them); each file that cannot be
        read or decoded is appended to `errors` as {"path", "error"} instead."""
        decoded, names = [], []
        for f in files:
            name = shown(f)
            try:
                decoded.append(self.decode(read_capped(f, name), name))
                names.append(name)
            except CifarCnnError as exc:
                errors.append({"path": name, "error": str(exc)})
            except OSError as exc:
                errors.append({"path": name, "error": f"{name}: cannot read ({exc.strerror or exc})"})
        return decoded, names


def format_report(report: PredictionReport) -> str:
    """Human-readable lines: one per prediction, `path  label  97.1%  (runner-ups)`."""
    lines = []
    for p in report.predictions:
        rest = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in p["top_k"][1:])
        lines.append(f"{p['path']}\t{p['label']}\t{100 * p['probability']:.1f}%" + (f"\t({rest})" if rest else ""))
    return "\n".join(lines)


def write_csv(path: str | Path, report: PredictionReport, top_k: int) -> None:
    """CSV with one row per file: path, label, probability, top1_label, top1_probability, ..., error (atomic)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["path", "label", "probability"]
    for i in range(1, top_k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    writer.writerow([*header, "error"])
    for p in report.predictions:
        cells: list[Any] = [p["path"], p["label"], f"{p['probability']:.6f}"]
        for i in range(top_k):
            t = p["top_k"][i] if i < len(p["top_k"]) else None
            cells += [t["label"], f"{t['probability']:.6f}"] if t else ["", ""]
        writer.writerow([*cells, ""])
    for e in report.errors:
        writer.writerow([e["path"], "", "", *([""] * 2 * top_k), e["error"]])
    try:
        atomic_write_text(Path(path), buf.getvalue())
    except OSError as exc:
        raise CifarCnnError(f"--csv {path}: cannot write ({exc.strerror or exc})") from None
