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
from .evaluate import evaluate_checkpoint

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
    NLL on those images before and after."""
    check_split(split)
    checkpoint = Path(checkpoint)
    target = Path(out) if out is not None else checkpoint
    if not target.parent.is_dir():
        raise CifarCnnError(f"--out {target}: folder {target.parent} does not exist")
    ckpt = load_checkpoint(checkpoint)
    try:
        held = evaluate_checkpoint(
            checkpoint,
            data,
            split=split,
            device=device,
            precision="fp32",
            batch_size=batch_size,
            threads=threads,
            home=home,
            log=log,
            splits=splits,
            ckpt=ckpt,
            with_logits=True,
        )
    except CifarCnnError as exc:
        if "split" in str(exc) and "empty" in str(exc):
            raise CifarCnnError(
                f"{checkpoint}: its run has no validation images to fit a temperature on (val_split 0); train with "
                "--calibrate (it holds out --calibration-images training images), or pass --split train"
            ) from None
        raise
    logits, labels = held.logits.numpy(), held.labels
    temperature = fit_temperature(logits, labels)
    record = {
        "split": split,
        "num_images": int(len(labels)),
        "before": _figures(logits, labels, 1.0),
        "after": _figures(logits, labels, temperature),
        "tta": held.metrics["tta"],
        "fitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "format_version")}
    payload.update(temperature=temperature, calibration=record)
    save_checkpoint(target, payload)
    what = "validation" if split == "val" else "training"
    before, after = record["before"], record["after"]
    log(
        f"temperature {temperature:.4f} fitted on {len(labels):,} {what} images: ECE {100 * before['ece']:.2f}% -> "
        f"{100 * after['ece']:.2f}%, NLL {before['nll']:.4f} -> {after['nll']:.4f}; wrote {target}"
    )
    if split == "train":
        log("note: the model has seen these images, so it is more confident on them than on new ones")
    return {"temperature": temperature, "checkpoint": str(target), **record}
