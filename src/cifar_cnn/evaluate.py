"""Evaluation: logits for a split (with optional test-time augmentation), the metrics computed from them, and a
whole checkpoint evaluated on a split of its data (`evaluate_checkpoint`, what `cifar-cnn evaluate` runs).

This sits below the engine: the engine validates and tests through it, and report, bench and export evaluate
checkpoints through it without importing the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calibration import calibration_metrics, softmax
from .checkpoint import checkpoint_temperature, load_checkpoint, model_from_checkpoint
from .choices import SPLITS, TTA_MODES, check_choice
from .data import Dataset, DataSource, Splits, load_dataset, make_splits
from .data.pipeline import resize_batch, to_tensor
from .data.preprocess import normalize
from .device import autocast, resolve_device, resolve_precision, set_threads
from .errors import CifarCnnError
from .metrics import classification_metrics
from .rundir import resolve_source


class EmptySplit(CifarCnnError):
    """The split asked for holds no images (a validation split of a run trained on all images)."""


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
    check_choice(mode, TTA_MODES, "--tta")
    raise AssertionError(mode)  # pragma: no cover


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
    size: int | None = None,
) -> torch.Tensor:
    """Float32 logits (N, classes) on the CPU for uint8 images (N, 3, H, W) (an array, a tensor or an ImageSet, read
    a batch at a time), normalized a batch at a time and resized to `size` (the model's input) when held smaller."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(to_tensor(images[i : i + batch_size]).to(device, non_blocking=True), mean, std)
            if size is not None:
                x = resize_batch(x, size)
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
    size: int | None = None,
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
        size=size,
    )
    result = classification_metrics(
        logits, to_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels, classes
    )
    result["tta"] = tta
    return result


@dataclass
class EvalResult(Mapping):
    """A checkpoint evaluated on a split: `metrics` as `evaluate --json` prints them (accuracy, top5_accuracy, loss,
    num_images, classes, per-class accuracy, precision and F1, confusion_matrix, ece, nll, temperature,
    uncalibrated, mean_confidence, reliability, tta, split, checkpoint, epoch, precision); with `with_logits`,
    also the float32 logits (N, classes) of the same forward pass and the split's uint8 images and labels they
    belong to."""

    metrics: dict[str, Any]
    logits: torch.Tensor | None = None
    images: Any = None  # uint8 (N, 3, S, S): an array or an ImageSet
    labels: np.ndarray | None = None

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    def __getitem__(self, key: str) -> Any:  # reads like the metrics dict: result["accuracy"]
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def probabilities(self) -> np.ndarray:
        """The probabilities as served, one row per image: softmax of the logits / the checkpoint's temperature."""
        if self.logits is None:
            raise ValueError("evaluated without with_logits=True")
        return softmax(self.logits.numpy(), float(self.metrics.get("temperature", 1.0))).astype(np.float32)


def checkpoint_splits(ds: Dataset, ckpt: dict[str, Any]) -> Splits:
    """The splits a checkpoint's run used: its config's val_split, seed, subset and calibration slice (so `val` is its
    validation set, and for a run trained on all images with --calibrate, the images held out for calibration)."""
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    calibration = int(cfg.get("calibration_images", 0)) if cfg.get("calibrate") else 0
    return make_splits(
        ds,
        float(cfg.get("val_split", 0.2)),
        int(cfg.get("seed", 0)),
        cfg.get("subset") or None,
        calibration,
        int(cfg.get("max_train_images") or 0),
    )


def _split_arrays(splits: Splits, split: str) -> tuple[np.ndarray, np.ndarray]:
    return {
        "test": (splits.test_images, splits.test_labels),
        "val": splits.held_out(),
        "train": (splits.train_images, splits.train_labels),
    }[split]


def check_finite_logits(logits: torch.Tensor, checkpoint: str | Path, split: str) -> None:
    """Refuse outputs that are NaN or infinite (finite weights can still overflow): an accuracy from them would be made
    up (argmax of NaN is class 0) and their loss NaN."""
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad:
        raise CifarCnnError(
            f"{checkpoint}: the model produced non-finite outputs (NaN or infinity) for {bad:,} of {len(logits):,} "
            f"{split} images; its weights overflow float32, so retrain it or use another checkpoint"
        )


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | DataSource | None = None,
    *,
    split: str = "test",
    tta: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1000,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
    splits: Splits | None = None,
    ckpt: dict[str, Any] | None = None,
    with_logits: bool = False,
) -> EvalResult:
    """Evaluate a checkpoint on a split of `data` (default: the data its run trained on, else 'cifar10'); the
    validation split is rebuilt from the checkpoint's config. `splits` and `ckpt` pass what a caller already has
    loaded (the engine after training), so nothing is decoded or read twice."""
    check_choice(split, SPLITS, "--split")
    set_threads(threads)
    ckpt = ckpt if ckpt is not None else load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    channels_last = prec != "fp32" and bool(ckpt.get("config", {}).get("channels_last", True))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    source = resolve_source(data, ckpt, Path(checkpoint).parent)
    skipped = 0
    if splits is None:
        ds = load_dataset(source, int(ckpt["input_size"]), home=home, threads=threads, log=log)
        splits, skipped = checkpoint_splits(ds, ckpt), len(ds.skipped)
    if list(splits.classes) != list(ckpt["classes"]):
        raise CifarCnnError(
            f"{checkpoint}: trained on classes {list(ckpt['classes'])} but the data has {list(splits.classes)}"
        )
    images, labels = _split_arrays(splits, split)
    if len(labels) == 0:
        raise EmptySplit(f"the {split} split of {source} is empty (the checkpoint was trained with val_split 0?)")
    mode = tta or ckpt.get("tta", "none")
    logits = predict_logits(
        model,
        images,
        tuple(ckpt["mean"]),
        tuple(ckpt["std"]),
        batch_size=batch_size,
        device=dev,
        precision=prec,
        tta=mode,
        channels_last=channels_last,
        size=int(ckpt["input_size"]),
    )
    check_finite_logits(logits, checkpoint, split)
    metrics = classification_metrics(logits, torch.from_numpy(np.asarray(labels)), list(ckpt["classes"]))
    temperature = checkpoint_temperature(ckpt, checkpoint, tta=mode)
    metrics.update(calibration_metrics(logits.numpy(), np.asarray(labels), temperature))
    metrics.update(tta=mode, split=split, checkpoint=str(checkpoint), epoch=ckpt.get("epoch"), precision=prec)
    if skipped:
        metrics["skipped_images"] = skipped  # label rows left out with --skip-bad
    if not with_logits:
        return EvalResult(metrics)
    return EvalResult(metrics, logits, images, np.asarray(labels))
