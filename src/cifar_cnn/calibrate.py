"""Fit a checkpoint's softmax temperature on held-out images and store it in the checkpoint (`cifar-cnn calibrate`,
`train --calibrate`).

The fit uses the run's validation split (for a run trained on all images with --calibrate: the training images held
out for it), or its training split when asked; never the test split, whose calibration figures it would flatter.
The logits are computed as predict serves them: fp32, with the checkpoint's test-time augmentation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import expected_calibration_error, fit_temperature, nll, softmax
from .checkpoint import load_checkpoint, save_checkpoint
from .choices import SPLITS, check_choice
from .data import DataSource, Splits
from .errors import CifarCnnError
from .evaluate import EmptySplit, EvalResult, evaluate_checkpoint

CALIBRATION_SPLITS = ("val", "train")


def check_split(split: str) -> str:
    """`split` if a temperature may be fitted on it (val or train)."""
    if split == "test":
        raise CifarCnnError(
            "--split test: fitting the temperature on the test split would flatter its calibration figures; use "
            "--split val (the run's held-out images)"
        )
    check_choice(split, SPLITS, "--split")
    return split


def _figures(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    return {
        "ece": expected_calibration_error(softmax(logits, temperature), labels),
        "nll": nll(logits, labels, temperature),
    }


def _held_out(checkpoint: Path, ckpt: dict[str, Any], split: str, tta: str | None, **kwargs: Any) -> EvalResult:
    """Logits of the checkpoint on `split`, fp32, with `tta` (None: the checkpoint's), as predict computes them."""
    try:
        return evaluate_checkpoint(
            checkpoint, split=split, tta=tta, precision="fp32", ckpt=ckpt, with_logits=True, **kwargs
        )
    except EmptySplit:
        if split != "val":
            raise
        raise CifarCnnError(
            f"{checkpoint}: its run has no validation images to fit a temperature on (val_split 0); train with "
            "--calibrate (it holds out --calibration-images training images), or pass --split train"
        ) from None


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: str | DataSource | None = None,
    *,
    split: str = "val",
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 1000,
    threads: int | None = None,
    home: Path | None = None,
    splits: Splits | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit the temperature of `checkpoint` on `split` of its run's data and write it into `out` (default: the
    checkpoint itself, replaced atomically). Returns what was fitted: temperature, split, num_images, and ECE and
    NLL on those images before and after.

    The temperature is fitted for the checkpoint's test-time augmentation (what predict and serve use); when that is
    not 'none', a second temperature is fitted without it (`calibration.temperature_by_tta`), for exported models and
    `--tta none`, whose logits are sharper or flatter than the averaged ones."""
    check_split(split)
    checkpoint = Path(checkpoint)
    target = Path(out) if out is not None else checkpoint
    if not target.parent.is_dir():
        raise CifarCnnError(f"--out {target}: folder {target.parent} does not exist")
    ckpt = load_checkpoint(checkpoint)
    common = dict(data=data, device=device, batch_size=batch_size, threads=threads, home=home, log=log)
    held = _held_out(checkpoint, ckpt, split, None, splits=splits, **common)
    logits, labels = held.logits.numpy(), held.labels
    temperature = fit_temperature(logits, labels)
    mode = held.metrics["tta"]
    by_tta = {mode: temperature}
    if mode != "none":
        plain = _held_out(checkpoint, ckpt, split, "none", splits=splits, **common)
        by_tta["none"] = fit_temperature(plain.logits.numpy(), plain.labels)
    record = {
        "split": split,
        "num_images": int(len(labels)),
        "before": _figures(logits, labels, 1.0),
        "after": _figures(logits, labels, temperature),
        "tta": mode,
        "temperature_by_tta": by_tta,
        "fitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "format_version")}
    payload.update(temperature=temperature, calibration=record)
    save_checkpoint(target, payload)
    _log_fit(record, temperature, target, log)
    return {"temperature": temperature, "checkpoint": str(target), **record}


def _log_fit(record: dict[str, Any], temperature: float, target: Path, log: Callable[[str], None]) -> None:
    what = "validation" if record["split"] == "val" else "training"
    before, after = record["before"], record["after"]
    log(
        f"temperature {temperature:.4f} fitted on {record['num_images']:,} {what} images: ECE "
        f"{100 * before['ece']:.2f}% -> {100 * after['ece']:.2f}%, NLL {before['nll']:.4f} -> {after['nll']:.4f}; "
        f"wrote {target}"
    )
    if record["tta"] != "none":
        log(f"without test-time augmentation (exported models, --tta none): {record['temperature_by_tta']['none']:.4f}")
    if record["split"] == "train":
        log("note: the model has seen these images, so it is more confident on them than on new ones")
